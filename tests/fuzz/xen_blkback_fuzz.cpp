// SPDX-License-Identifier: Apache-2.0
// Fuzzes the blkif back end (transports/xen/blkback*) in-process over the
// host-local hypervisor: a hostile front end (domain 1) whose xenstore
// handshake values and ring contents come from the input. Each input attaches
// a fresh virtual block device, writes the front end's keys (ring-page-order,
// ring-ref*, event-channel, protocol, feature-persistent,
// multi-queue-num-queues; each correct, missing, wrong or arbitrary text),
// then drives the ring: raw blkif requests (direct, indirect, flush, discard,
// any operation byte) whose grant refs point at the front end's own pages,
// a read-only page, the ring itself or anything else; indirect segment
// lists; scribbled ring indices and event indices; revoked grants and state
// changes mid-flight. Checked after each input:
//   - with a well-formed handshake the device connects;
//   - while the front end keeps to the ring rules, every request is answered
//     once, with an id it sent and a blkif status, within 5 s (no hang);
//   - the read-only page is untouched;
//   - no byte of the disk changed outside the sectors some write or discard
//     request named.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>
#include <vector>

#include "storage/vstore.hpp"
#include "tests/fuzz/xen_fuzz_util.hpp"
#include "transports/memory/memory.hpp"
#include "transports/xen/blkback.hpp"
#include "transports/xen/blkif.hpp"

namespace {

using namespace uvd;
using namespace uvd::xen;
using namespace uvd::xen::fuzz;

constexpr uint64_t disk_bytes = 512 << 10;
constexpr uint64_t disk_sectors = disk_bytes / blk_sector;
constexpr size_t n_data = 8;
constexpr uint8_t ro_fill = 0x5a;

struct world {
  fuzz_hub hub;
  std::unique_ptr<blkback> back;
  std::shared_ptr<storage::Vstore> disks[2];
  std::unique_ptr<hypervisor> front;
  std::unique_ptr<store> st;
  std::vector<std::byte> pattern, check;
  uint32_t next_vdev = 0;

  world() {
    spdlog::set_level(spdlog::level::off);
    auto b = blkback::start(hub.domain(0));
    XEN_FUZZ_CHECK(b);
    back = std::move(*b);
    const char* opts[2] = {"", "async=1"};  // completed inside submit, or from a worker thread
    for (int i = 0; i < 2; ++i) {
      storage::open_options oo;
      oo.options = opts[i];
      auto v = storage::Vstore::open(memory::memory_vstore_ops, "512K", oo);
      XEN_FUZZ_CHECK(v);
      disks[i] = std::move(*v);
    }
    front = hub.domain(1);
    auto s = front->open_store();
    XEN_FUZZ_CHECK(s);
    st = std::move(*s);
    pattern.resize(disk_bytes);
    check.resize(disk_bytes);
    for (size_t i = 0; i < disk_bytes; ++i) pattern[i] = static_cast<std::byte>((i * 131 + (i >> 9)) & 0xff);
  }
};

struct trial {
  world& w;
  reader& in;
  uint32_t vdev;
  std::string fdir, bdir;
  uint32_t order = 0;
  std::unique_ptr<granted_pages> ring_pages, ro, ind;
  std::unique_ptr<granted_pages> data[n_data];
  std::unique_ptr<event_channel> evt;
  std::vector<grant_ref_t> table;  // what a fuzzed ref below 2^31 stands for
  blk_front_ring ring;
  bool clean = true;    // the handshake was well formed: it must connect
  bool orderly = true;  // the front end kept to the ring rules: every request must be answered
  std::map<uint64_t, int> owed;  // ids sent and not yet answered
  uint32_t sent = 0, got = 0;
  std::vector<std::pair<uint64_t, uint64_t>> windows;  // sectors [a, b) a write or discard may touch

  grant_ref_t translate(grant_ref_t g) const { return (g & 0x80000000u) ? (g & 0x7fffffffu) : table[g % table.size()]; }
  // A request that names the ring's own pages may have the back end read disk
  // data over the ring: legal for the back end, but the ring rules are off then.
  void watch_ring(grant_ref_t g) {
    for (size_t i = 0; i < ring_pages->count(); ++i)
      if (ring_pages->ref(i) == g) orderly = false;
  }
  void fix_ref(grant_ref_t& g, bool raw) {
    if (!raw) g = translate(g);
    watch_ring(g);
  }

  void write_key(const std::string& k, const std::string& v) { (void)w.st->write(no_txn, fdir + "/" + k, v); }

  // The front end's keys, each chosen by one input byte.
  void handshake_keys() {
    uint8_t k = in.u8();
    switch (k % 4) {
      case 0:  // ring-page-order and ring-ref0..N-1
        write_key("ring-page-order", std::to_string(order));
        for (uint32_t i = 0; i < (1u << order); ++i) write_key("ring-ref" + std::to_string(i), std::to_string(ring_pages->ref(i)));
        break;
      case 1:  // a single-page ring, the old way
        order = 0;
        write_key("ring-ref", std::to_string(ring_pages->ref(0)));
        break;
      case 2:  // an arbitrary order; refs for as many pages as we have
        write_key("ring-page-order", in.str());
        for (uint32_t i = 0; i < (1u << order); ++i) write_key("ring-ref" + std::to_string(i), std::to_string(ring_pages->ref(i)));
        clean = orderly = false;  // the back end may see a ring of another size
        break;
      case 3: {  // one ring ref that is wrong: text, a data page's, a read-only page's, or missing
        write_key("ring-page-order", std::to_string(order));
        uint32_t bad = (k >> 2) % (1u << order);
        for (uint32_t i = 0; i < (1u << order); ++i) {
          std::string key = "ring-ref" + std::to_string(i);
          if (i != bad) {
            write_key(key, std::to_string(ring_pages->ref(i)));
            continue;
          }
          switch ((k >> 5) & 3) {
            case 0: write_key(key, in.str()); break;
            case 1: write_key(key, std::to_string(data[0]->ref(0))); break;
            case 2: write_key(key, std::to_string(ro->ref(0))); break;
            case 3: break;
          }
        }
        clean = orderly = false;  // the back end may see another page as the ring
        break;
      }
    }
    k = in.u8();
    switch (k % 4) {
      case 0:
      case 1: write_key("event-channel", std::to_string(evt->local_port())); break;
      case 2: write_key("event-channel", in.str()); clean = false; break;
      case 3: write_key("event-channel", std::to_string(evt->local_port() + 1 + (k >> 2))); clean = false; break;
    }
    k = in.u8();
    switch (k % 4) {
      case 0: break;
      case 1: write_key("protocol", XEN_IO_PROTO_ABI_NATIVE); break;
      case 2: write_key("protocol", XEN_IO_PROTO_ABI_X86_32); clean = false; break;
      case 3: write_key("protocol", in.str()); clean = false; break;
    }
    k = in.u8();
    switch (k % 4) {
      case 0: write_key("feature-persistent", "0"); break;
      case 1: write_key("feature-persistent", "1"); break;
      case 2: break;
      case 3: write_key("feature-persistent", in.str()); break;  // anything but "1" means no
    }
    k = in.u8();
    switch (k % 4) {
      case 0: break;
      case 1: write_key("multi-queue-num-queues", "1"); break;
      case 2: write_key("multi-queue-num-queues", "2"); clean = false; break;
      case 3: write_key("multi-queue-num-queues", in.str()); clean = false; break;
    }
  }

  void note_window(uint64_t sector, uint64_t nsect) {
    uint64_t a = std::min(sector, disk_sectors), b = std::min(sector + std::min<uint64_t>(nsect, disk_sectors), disk_sectors);
    if (sector > UINT64_MAX - disk_sectors) b = disk_sectors;
    if (a < b) windows.emplace_back(a, b);
  }

  void add_request() {
    blkif_request r;
    in.bytes(&r, sizeof r);
    uint8_t mode = in.u8();
    if (mode & 1) r.id = sent;            // a fresh id (else whatever the input says: reuse is allowed to happen)
    if (mode & 2) r.operation = (mode >> 4) % 6;  // one of the defined operations
    if (r.operation == BLKIF_OP_INDIRECT) {
      blkif_request_indirect ind;
      std::memcpy(&ind, &r, sizeof ind);
      for (auto& g : ind.indirect_grefs) fix_ref(g, mode & 4);
      if (mode & 8) ind.sector_number %= disk_sectors + 16;
      if (ind.indirect_op != BLKIF_OP_READ) note_window(ind.sector_number, uint64_t{ind.nr_segments} * blk_sectors_per_page);
      std::memcpy(&r, &ind, sizeof ind);
    } else if (r.operation == BLKIF_OP_DISCARD) {
      blkif_request_discard d;
      std::memcpy(&d, &r, sizeof d);
      if (mode & 8) {
        d.sector_number %= disk_sectors + 16;
        d.nr_sectors %= 256;
      }
      note_window(d.sector_number, d.nr_sectors);
      std::memcpy(&r, &d, sizeof d);
    } else {
      for (auto& s : r.seg) fix_ref(s.gref, mode & 4);
      if (mode & 8) r.sector_number %= disk_sectors + 16;
      if (r.operation != BLKIF_OP_READ) note_window(r.sector_number, uint64_t{std::min<uint8_t>(r.nr_segments, BLKIF_MAX_SEGMENTS_PER_REQUEST)} * blk_sectors_per_page);
    }
    std::memcpy(ring.next_request(), &r, sizeof r);
    ring.produce();
    ++owed[r.id];
    ++sent;
  }

  // An indirect page's segment list, partly from the input.
  void fill_indirect() {
    uint8_t which = in.u8();
    auto* list = reinterpret_cast<blkif_request_segment*>(static_cast<std::byte*>(ind->addr()) + (which & 1) * page_size);
    uint32_t at = in.u16() % blk_segs_per_indirect_page;
    uint32_t n = std::min<uint32_t>(in.u8() % 32, blk_segs_per_indirect_page - at);
    for (uint32_t i = 0; i < n; ++i) {
      blkif_request_segment s;
      in.bytes(&s, sizeof s);
      fix_ref(s.gref, which & 2);
      if (which & 4) {
        s.first_sect %= blk_sectors_per_page;
        s.last_sect = static_cast<uint8_t>(s.first_sect + s.last_sect % (blk_sectors_per_page - s.first_sect));
      }
      std::memcpy(&list[at + i], &s, sizeof s);
    }
  }

  void push() {
    if (ring.push_requests() || (in.u8() & 1)) (void)evt->notify();  // sometimes a spurious notify too
  }

  // Takes every response there is; checks each against what was sent.
  bool take_responses() {
    blkif_response rsp;
    core::ring_take t;
    while ((t = ring.take_response(&rsp)) == core::ring_take::item) {
      ++got;
      if (!orderly) continue;
      auto it = owed.find(rsp.id);
      XEN_FUZZ_CHECK(it != owed.end());  // an answer to a request never sent
      if (--it->second == 0) owed.erase(it);
      XEN_FUZZ_CHECK(rsp.status == BLKIF_RSP_OKAY || rsp.status == BLKIF_RSP_ERROR || rsp.status == BLKIF_RSP_EOPNOTSUPP);
    }
    if (orderly) XEN_FUZZ_CHECK(t != core::ring_take::broken);
    return t != core::ring_take::broken;
  }

  // Waits until everything sent is answered (orderly front ends only).
  void collect() {
    (void)ring.push_requests();
    (void)evt->notify();
    bool ok = wait_until(*evt, [&] { return !take_responses() || got >= sent; }, 5000);
    if (orderly) {
      XEN_FUZZ_CHECK(ok);  // the back end stopped answering a well-behaved ring
      XEN_FUZZ_CHECK(got == sent && owed.empty());
    }
  }

  void run_ring() {
    for (int ops = 0; ops < 200 && !in.empty(); ++ops) {
      switch (in.u8() % 10) {
        case 0: case 1: case 2: case 3:
          if (ring.full()) {
            if (!orderly) return;
            collect();
          }
          add_request();
          break;
        case 4: fill_indirect(); break;
        case 5: push(); break;
        case 6: if (orderly) collect(); break;
        case 7: {  // the front end writes the shared header
          uint8_t which = in.u8() % 4;
          uint32_t v = in.u32();
          core::sring_header* h = ring.shared();
          switch (which) {
            case 0: __atomic_store_n(&h->req_event, v, __ATOMIC_RELEASE); break;
            case 1: __atomic_store_n(&h->rsp_event, v, __ATOMIC_RELEASE); break;
            case 2:  // a producer index of its own choosing: the ring rules are off
              __atomic_store_n(&h->req_prod, (v & 0x100) ? v : ring.shared()->req_prod + (v & 0xff), __ATOMIC_RELEASE);
              orderly = false;
              break;
            case 3: std::memcpy(h->pad, &v, sizeof v); break;
          }
          (void)evt->notify();
          break;
        }
        case 8: {  // a data page's grant ends while the back end may still use it
          uint8_t i = in.u8() % n_data;
          data[i].reset();
          break;
        }
        case 9: {  // a state change mid-connection
          uint8_t s = in.u8();
          write_key("state", (s & 0x80) ? in.str() : std::to_string(s % 9));
          orderly = false;
          break;
        }
      }
    }
  }

  void run() {
    uint8_t flags = in.u8();
    bool read_only = flags & 1;
    auto& disk = w.disks[(flags >> 1) & 1];
    order = (flags >> 2) % 3;
    XEN_FUZZ_CHECK(disk->write(0, w.pattern.data(), disk_bytes));
    XEN_FUZZ_CHECK(w.back->add_device(1, vdev, disk, read_only));
    fdir = blk_frontend_dir(1, vdev);
    bdir = blk_backend_dir(0, 1, vdev);
    XEN_FUZZ_CHECK(w.st->watch(bdir + "/state", "b"));
    XEN_FUZZ_CHECK(wait_backend(*w.st, bdir, [](int s) { return s == XenbusStateInitWait; }, 5000) == XenbusStateInitWait);

    auto rp = w.front->grant_pages(0, size_t{1} << order, true);
    auto r = w.front->grant_pages(0, 1, false);
    auto id = w.front->grant_pages(0, 2, true);
    auto e = w.front->alloc_unbound(0);
    XEN_FUZZ_CHECK(rp && r && id && e);
    ring_pages = std::move(*rp);
    ro = std::move(*r);
    ind = std::move(*id);
    evt = std::move(*e);
    std::memset(ro->addr(), ro_fill, page_size);
    for (auto& d : data) {
      auto g = w.front->grant_pages(0, 1, true);
      XEN_FUZZ_CHECK(g);
      d = std::move(*g);
      table.push_back(d->ref(0));
    }
    table.push_back(ro->ref(0));
    table.push_back(ind->ref(0));
    table.push_back(ind->ref(1));
    for (size_t i = 0; i < ring_pages->count(); ++i) table.push_back(ring_pages->ref(i));

    handshake_keys();
    XEN_FUZZ_CHECK(ring.init(ring_pages->addr(), (size_t{1} << order) * page_size));
    write_key("state", std::to_string(in.u8() % 4 == 3 ? XenbusStateConnected : XenbusStateInitialised));
    int bs = wait_backend(*w.st, bdir, [](int s) { return s != XenbusStateInitWait; }, clean ? 5000 : 300);
    if (clean) XEN_FUZZ_CHECK(bs == XenbusStateConnected);
    if (bs == XenbusStateConnected) {
      run_ring();
      if (orderly) collect();
    }
    (void)w.st->unwatch(bdir + "/state", "b");
    // Detach: the back end lets go of the ring and waits for what the disk holds.
    XEN_FUZZ_CHECK(w.back->remove_device(1, vdev));
    for (size_t i = 0; i < page_size; ++i) XEN_FUZZ_CHECK(static_cast<uint8_t*>(ro->addr())[i] == ro_fill);
    XEN_FUZZ_CHECK(disk->read(0, w.check.data(), disk_bytes));
    std::vector<bool> touched(disk_sectors);
    for (auto [a, b] : windows)
      for (uint64_t s = a; s < b; ++s) touched[s] = true;
    for (uint64_t s = 0; s < disk_sectors; ++s)
      if (!touched[s]) XEN_FUZZ_CHECK(std::memcmp(&w.check[s * blk_sector], &w.pattern[s * blk_sector], blk_sector) == 0);
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static world w;
  reader in(data, size);
  trial s{w, in, ++w.next_vdev};
  s.run();
  return 0;
}
