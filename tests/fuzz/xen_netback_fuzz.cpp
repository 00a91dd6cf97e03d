// SPDX-License-Identifier: Apache-2.0
// Fuzzes the netif back end (transports/xen/vif_back.cpp, vif_port.cpp) in
// the real netback switch, in-process over the host-local hypervisor: a
// hostile front end (domain 1) whose xenstore values (tx-ring-ref,
// rx-ring-ref, event-channel, request-rx-copy, mac, feature-persistent,
// multi-queue-num-queues) and ring contents come from the input: tx slots
// with any flags (more_data chains, extra_info chains, csum_blank,
// data_validated), offsets, sizes
// and grant refs; rx buffers posted with any refs and ids; scribbled ring
// indices; revoked grants and state changes. A second switch port (in this
// file) injects frames towards the interface, so the rx ring is filled too,
// and checks what the switch delivers from it. Checked after each input:
//   - with a well-formed handshake the interface connects;
//   - while the front end keeps to the ring rules, every tx slot of a
//     finished chain (netif.h's grammar: first slot, extra-info slots while
//     the one before asks for more, data slots while more_data) is answered
//     once, with its id, within 5 s;
//   - rx responses carry ids that were posted and sizes within a page;
//   - the read-only page is untouched;
//   - frames that leave the switch from the interface never carry the peer's
//     MAC or a multicast source.
#include <sys/eventfd.h>

#include <spdlog/spdlog.h>

#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "net/netback.hpp"
#include "tests/fuzz/xen_fuzz_util.hpp"
#include "transports/xen/netif.hpp"
#include "transports/xen/vif_back.hpp"

namespace {

using namespace uvd;
using namespace uvd::xen;
using namespace uvd::xen::fuzz;

constexpr size_t n_data = 8;
constexpr uint8_t ro_fill = 0xa5;
const net::mac_addr vif_mac{{0x02, 0x16, 0x3e, 0x00, 0x00, 0x01}};
const net::mac_addr peer_mac{{0x02, 0x16, 0x3e, 0x00, 0x00, 0x02}};
const net::mac_addr other_mac{{0x02, 0x16, 0x3e, 0x00, 0x00, 0x03}};

// The other end of the switch: frames queued by the fuzzer enter the switch
// here; frames the switch sends here are checked.
class peer_port final : public net::port {
 public:
  peer_port() : efd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) { XEN_FUZZ_CHECK(efd_ >= 0); }
  ~peer_port() override { ::close(efd_); }
  std::string name() const override { return "fuzz-peer"; }
  uint32_t rx_burst(core::veth_frame* frames, uint32_t n, net::port_stats&) override {
    uint64_t v;
    (void)::read(efd_, &v, sizeof v);
    std::lock_guard lk(mu_);
    held_.clear();
    uint32_t k = 0;
    while (k < n && !q_.empty()) {
      held_.push_back(std::move(q_.front()));
      q_.pop_front();
      ++k;
    }
    for (uint32_t i = 0; i < k; ++i) {
      frames[i] = {};
      frames[i].data = held_[i].data();
      frames[i].len = static_cast<uint32_t>(held_[i].size());
    }
    return k;
  }
  uint32_t tx_burst(core::veth_frame* const* frames, uint32_t n) override {
    for (uint32_t i = 0; i < n; ++i) {
      const core::veth_frame& f = *frames[i];
      XEN_FUZZ_CHECK(f.len >= 14 && f.len <= net_max_frame);
      // Only the interface sends here (the peer's own frames never come back), with a
      // unicast source that is not the peer's: the switch let a forged one through.
      XEN_FUZZ_CHECK(std::memcmp(f.data + 6, peer_mac.data(), 6) != 0 && !(f.data[6] & 1));
    }
    return n;
  }
  void fds(std::vector<int>& out) const override { out.push_back(efd_); }
  bool alive() const override { return true; }
  bool offloads() const override { return false; }
  uint32_t mtu() const override { return net_max_mtu; }
  std::optional<net::mac_addr> owned_mac() const override { return peer_mac; }

  void inject(std::vector<uint8_t> f) {
    {
      std::lock_guard lk(mu_);
      if (q_.size() > 256) return;
      q_.push_back(std::move(f));
    }
    uint64_t one = 1;
    (void)::write(efd_, &one, sizeof one);
  }

 private:
  int efd_;
  std::mutex mu_;
  std::deque<std::vector<uint8_t>> q_;
  std::vector<std::vector<uint8_t>> held_;  // handed to the switch until the next rx_burst
};

struct world {
  fuzz_hub hub;
  std::unique_ptr<net::Netback> nb;
  vif_backend* back = nullptr;  // owned by nb
  peer_port* peer = nullptr;    // owned by nb
  std::thread loop;
  std::unique_ptr<hypervisor> front;
  std::unique_ptr<store> st;
  uint32_t next_handle = 0;

  world() {
    spdlog::set_level(spdlog::level::off);
    auto vb = vif_backend::start(std::shared_ptr<hypervisor>(hub.domain(0)));
    XEN_FUZZ_CHECK(vb);
    back = vb->get();
    auto n = net::Netback::create();
    XEN_FUZZ_CHECK(n);
    nb = std::move(*n);
    auto p = std::make_unique<peer_port>();
    peer = p.get();
    nb->add_port(std::move(p));
    nb->add_source(std::move(*vb));
    loop = std::thread([this] { (void)nb->run(); });
    front = hub.domain(1);
    auto s = front->open_store();
    XEN_FUZZ_CHECK(s);
    st = std::move(*s);
  }
  ~world() {
    nb->stop();
    loop.join();
  }
};

struct trial {
  world& w;
  reader& in;
  uint32_t handle;
  std::string fdir, bdir;
  std::unique_ptr<granted_pages> txp, rxp, ro;
  std::unique_ptr<granted_pages> data[n_data];
  std::unique_ptr<event_channel> evt;
  std::vector<grant_ref_t> table;
  net_tx_front_ring tx;
  net_rx_front_ring rx;
  bool clean = true, orderly = true;
  std::map<uint16_t, int> tx_owed, rx_owed;  // ids of slots owed an answer / buffers posted
  uint32_t tx_done = 0;   // slots of finished chains (each owed one answer)
  uint32_t tx_open = 0;   // slots of the chain being built
  bool tx_more = false, tx_extra_next = false;
  uint32_t tx_got = 0;
  uint16_t next_id = 0;

  grant_ref_t translate(grant_ref_t g) const { return (g & 0x80000000u) ? (g & 0x7fffffffu) : table[g % table.size()]; }
  // An rx buffer on one of the rings has the back end copy a frame over the
  // ring: legal for the back end, but the ring rules are off then.
  bool on_ring(grant_ref_t g) const { return g == txp->ref(0) || g == rxp->ref(0); }
  void write_key(const std::string& k, const std::string& v) { (void)w.st->write(no_txn, fdir + "/" + k, v); }

  void ring_ref_key(const char* key, const granted_pages& right) {
    uint8_t k = in.u8();
    switch (k % 6) {
      case 0: case 1: case 2: write_key(key, std::to_string(right.ref(0))); break;
      case 3: write_key(key, in.str()); clean = false; break;
      case 4: write_key(key, std::to_string(table[k % table.size()])); clean = orderly = false; break;
      case 5: clean = false; break;  // missing
    }
  }

  void handshake_keys(bool fixed_mac) {
    ring_ref_key("tx-ring-ref", *txp);
    ring_ref_key("rx-ring-ref", *rxp);
    uint8_t k = in.u8();
    switch (k % 4) {
      case 0: case 1: write_key("event-channel", std::to_string(evt->local_port())); break;
      case 2: write_key("event-channel", in.str()); clean = false; break;
      case 3: write_key("event-channel", std::to_string(evt->local_port() + 1 + (k >> 2))); clean = false; break;
    }
    k = in.u8();
    switch (k % 4) {
      case 0: case 1: write_key("request-rx-copy", "1"); break;
      case 2: write_key("request-rx-copy", "0"); clean = false; break;
      case 3: write_key("request-rx-copy", in.str()); clean = false; break;
    }
    k = in.u8();
    switch (k % 4) {
      case 0: break;
      case 1: write_key("feature-persistent", "1"); break;
      case 2: write_key("feature-persistent", "0"); break;
      case 3: write_key("feature-persistent", in.str()); break;
    }
    k = in.u8();
    switch (k % 4) {
      case 0: case 1: break;
      case 2: write_key("multi-queue-num-queues", "1"); break;
      case 3: write_key("multi-queue-num-queues", in.str()); clean = false; break;
    }
    k = in.u8();
    if (k % 4 == 3) {
      write_key("mac", in.str());
      if (!fixed_mac) clean = false;
    } else if (!fixed_mac || k % 4 == 1) {
      write_key("mac", vif_mac.to_string());
    }
  }

  // One tx slot; the first slot of a chain may carry a well-formed Ethernet header.
  void add_tx() {
    netif_tx_request r;
    in.bytes(&r, sizeof r);
    uint8_t mode = in.u8();
    if (!(mode & 1)) r.gref = translate(r.gref);
    if (mode & 2) r.offset %= page_size;
    if (mode & 4) r.size = static_cast<uint16_t>(r.size % (tx_open == 0 ? net_max_frame + 1 : page_size + 1));
    if (mode & 8) r.id = next_id++;
    if (mode & 16) r.flags &= NETTXF_more_data;  // a plain data slot
    if (tx_open == 0 && (mode & 32)) {
      // A frame header in the page the slot names (if it is one of ours).
      for (auto& d : data)
        if (d && d->ref(0) == r.gref && r.offset + 14u <= page_size) {
          auto* p = static_cast<uint8_t*>(d->addr()) + r.offset;
          std::memcpy(p, (mode & 64) ? peer_mac.data() : net::mac_addr{{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}.data(), 6);
          std::memcpy(p + 6, (mode & 128) ? peer_mac.data() : vif_mac.data(), 6);  // a forged source now and then
          p[12] = 0x08;
          p[13] = 0x00;
        }
    }
    std::memcpy(tx.next_request(), &r, sizeof r);
    tx.produce();
    ++tx_owed[r.id];
    if (tx_open == 0) {
      tx_more = r.flags & NETTXF_more_data;
      tx_extra_next = r.flags & NETTXF_extra_info;
    } else if (tx_extra_next) {
      netif_extra_info e;
      std::memcpy(&e, &r, sizeof e);
      tx_extra_next = e.flags & XEN_NETIF_EXTRA_FLAG_MORE;
    } else {
      tx_more = r.flags & NETTXF_more_data;
    }
    ++tx_open;
    if (!tx_more && !tx_extra_next) {
      tx_done += tx_open;
      tx_open = 0;
    }
  }

  void add_rx() {
    netif_rx_request r;
    in.bytes(&r, sizeof r);
    uint8_t mode = in.u8();
    if (!(mode & 1)) r.gref = translate(r.gref);
    if (on_ring(r.gref)) orderly = false;
    std::memcpy(rx.next_request(), &r, sizeof r);
    rx.produce();
    ++rx_owed[r.id];
    if (rx.push_requests()) (void)evt->notify();
  }

  void inject() {
    uint16_t len = in.u16();
    uint8_t mode = in.u8();
    if (mode & 1) len = static_cast<uint16_t>(14 + len % (net_max_frame - 13));
    std::vector<uint8_t> f(len);
    for (size_t i = 0; i < f.size(); ++i) f[i] = static_cast<uint8_t>(i * 7 + mode);
    if (len >= 14) {
      std::memcpy(f.data(), (mode & 2) ? vif_mac.data() : net::mac_addr{{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}.data(), 6);
      std::memcpy(f.data() + 6, peer_mac.data(), 6);
    }
    w.peer->inject(std::move(f));
  }

  bool take_responses() {
    bool ok = true;
    netif_tx_response t;
    core::ring_take k;
    while ((k = tx.take_response(&t)) == core::ring_take::item) {
      ++tx_got;
      if (!orderly) continue;
      auto it = tx_owed.find(t.id);
      XEN_FUZZ_CHECK(it != tx_owed.end());
      if (--it->second == 0) tx_owed.erase(it);
      XEN_FUZZ_CHECK(t.status == NETIF_RSP_OKAY || t.status == NETIF_RSP_ERROR || t.status == NETIF_RSP_DROPPED ||
                     t.status == NETIF_RSP_NULL);
    }
    if (k == core::ring_take::broken) ok = false;
    netif_rx_response r;
    while ((k = rx.take_response(&r)) == core::ring_take::item) {
      if (!orderly) continue;
      auto it = rx_owed.find(r.id);
      XEN_FUZZ_CHECK(it != rx_owed.end());  // a buffer that was never posted
      if (--it->second == 0) rx_owed.erase(it);
      XEN_FUZZ_CHECK(r.status <= static_cast<int16_t>(page_size) && r.offset == 0);
    }
    if (k == core::ring_take::broken) ok = false;
    if (orderly) XEN_FUZZ_CHECK(ok);
    return ok;
  }

  void collect() {
    (void)tx.push_requests();
    (void)evt->notify();
    bool ok = wait_until(*evt, [&] { return !take_responses() || tx_got >= tx_done; }, 5000);
    if (orderly) XEN_FUZZ_CHECK(ok && tx_got == tx_done);  // a well-behaved tx ring went unanswered
  }

  void run_ring() {
    for (int ops = 0; ops < 200 && !in.empty(); ++ops) {
      switch (in.u8() % 11) {
        case 0: case 1: case 2:
          if (tx.full()) {
            if (!orderly || tx_open == tx.size()) return;
            collect();
            if (tx.full()) return;  // the open chain fills the ring
          }
          add_tx();
          break;
        case 3:
          if (rx.full()) {
            (void)take_responses();
            if (rx.full()) break;
          }
          add_rx();
          break;
        case 4: inject(); break;
        case 5:
          if (tx.push_requests() || (in.u8() & 1)) (void)evt->notify();
          break;
        case 6: if (orderly) collect(); else (void)take_responses(); break;
        case 7: {  // the front end writes a shared header
          uint8_t which = in.u8() % 6;
          uint32_t v = in.u32();
          core::sring_header* h = (which & 1) ? rx.shared() : tx.shared();
          switch (which / 2) {
            case 0: __atomic_store_n(&h->req_event, v, __ATOMIC_RELEASE); break;
            case 1: __atomic_store_n(&h->rsp_event, v, __ATOMIC_RELEASE); break;
            case 2:
              __atomic_store_n(&h->req_prod, (v & 0x1000) ? v : h->req_prod + (v & 0x1ff), __ATOMIC_RELEASE);
              orderly = false;
              break;
          }
          (void)evt->notify();
          break;
        }
        case 8: data[in.u8() % n_data].reset(); break;
        case 9: {
          uint8_t s = in.u8();
          write_key("state", (s & 0x80) ? in.str() : std::to_string(s % 9));
          orderly = false;
          break;
        }
        case 10: write_key("mac", (in.u8() & 1) ? in.str() : other_mac.to_string()); break;  // a MAC change
      }
    }
  }

  void run() {
    uint8_t flags = in.u8();
    bool fixed_mac = flags & 1;
    XEN_FUZZ_CHECK(w.back->add_vif(1, handle, fixed_mac ? std::optional(vif_mac) : std::nullopt));
    fdir = vif_frontend_dir(1, handle);
    bdir = vif_backend_dir(0, 1, handle);
    XEN_FUZZ_CHECK(w.st->watch(bdir + "/state", "b"));
    XEN_FUZZ_CHECK(wait_backend(*w.st, bdir, [](int s) { return s == XenbusStateInitWait; }, 5000) == XenbusStateInitWait);
    auto t = w.front->grant_pages(0, 1, true), r = w.front->grant_pages(0, 1, true), o = w.front->grant_pages(0, 1, false);
    auto e = w.front->alloc_unbound(0);
    XEN_FUZZ_CHECK(t && r && o && e);
    txp = std::move(*t);
    rxp = std::move(*r);
    ro = std::move(*o);
    evt = std::move(*e);
    std::memset(ro->addr(), ro_fill, page_size);
    for (auto& d : data) {
      auto g = w.front->grant_pages(0, 1, true);
      XEN_FUZZ_CHECK(g);
      d = std::move(*g);
      table.push_back(d->ref(0));
    }
    table.push_back(ro->ref(0));
    table.push_back(txp->ref(0));
    table.push_back(rxp->ref(0));
    XEN_FUZZ_CHECK(tx.init(txp->addr(), page_size) && rx.init(rxp->addr(), page_size));
    handshake_keys(fixed_mac);
    write_key("state", std::to_string(in.u8() % 4 == 3 ? XenbusStateInitialised : XenbusStateConnected));
    int bs = wait_backend(*w.st, bdir, [](int s) { return s != XenbusStateInitWait; }, clean ? 5000 : 300);
    if (clean) XEN_FUZZ_CHECK(bs == XenbusStateConnected);
    if (bs == XenbusStateConnected) {
      run_ring();
      if (orderly) collect();
    }
    (void)w.st->unwatch(bdir + "/state", "b");
    XEN_FUZZ_CHECK(w.back->remove_vif(1, handle));
    for (size_t i = 0; i < page_size; ++i) XEN_FUZZ_CHECK(static_cast<uint8_t*>(ro->addr())[i] == ro_fill);
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static world w;
  reader in(data, size);
  trial s{w, in, ++w.next_handle};
  s.run();
  return 0;
}
