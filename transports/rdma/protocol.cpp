// SPDX-License-Identifier: Apache-2.0
#include "transports/rdma/protocol.hpp"

#include <endian.h>

#include <algorithm>
#include <cstring>

namespace uvd::rdma {

namespace {

// Little-endian cursor writes and reads; the reader never reads past its span.
class writer {
 public:
  explicit writer(std::byte* p) : p_(p) {}
  void u16(uint16_t v) { v = htole16(v); put(&v, 2); }
  void u32(uint32_t v) { v = htole32(v); put(&v, 4); }
  void u64(uint64_t v) { v = htole64(v); put(&v, 8); }
  void bytes(const void* b, size_t n) { put(b, n); }
  void zeros(size_t n) { std::memset(p_ + n_, 0, n); n_ += n; }
  size_t size() const { return n_; }
  std::byte* at(size_t off) { return p_ + off; }

 private:
  void put(const void* b, size_t n) { std::memcpy(p_ + n_, b, n); n_ += n; }
  std::byte* p_;
  size_t n_ = 0;
};

class reader {
 public:
  explicit reader(std::span<const std::byte> in) : in_(in) {}
  bool has(size_t n) const { return in_.size() - n_ >= n; }
  uint16_t u16() { uint16_t v; get(&v, 2); return le16toh(v); }
  uint32_t u32() { uint32_t v; get(&v, 4); return le32toh(v); }
  uint64_t u64() { uint64_t v; get(&v, 8); return le64toh(v); }
  void bytes(void* b, size_t n) { get(b, n); }
  void skip(size_t n) { n_ += n; }
  size_t left() const { return in_.size() - n_; }

 private:
  void get(void* b, size_t n) { std::memcpy(b, in_.data() + n_, n); n_ += n; }
  std::span<const std::byte> in_;
  size_t n_ = 0;
};

void put_hdr(writer& w, uint16_t opcode, uint32_t epoch, uint64_t id) {
  w.u32(msg_magic);
  w.u16(protocol_version);
  w.u16(opcode);
  w.u32(0);  // length, patched by finish()
  w.u32(epoch);
  w.u64(id);
}

size_t finish(writer& w) {
  uint32_t len = htole32(static_cast<uint32_t>(w.size()));
  std::memcpy(w.at(8), &len, 4);
  return w.size();
}

core::unexpected bad(const std::string& what) { return core::fail(EPROTO, what); }

// Reads the header and checks it against the message it came in.
core::result<msg_hdr> read_hdr(reader& r, size_t total) {
  if (!r.has(hdr_size)) return bad("message of " + std::to_string(total) + " bytes is shorter than a header");
  uint32_t magic = r.u32();
  uint16_t version = r.u16();
  msg_hdr h;
  h.opcode = r.u16();
  h.length = r.u32();
  h.epoch = r.u32();
  h.id = r.u64();
  if (magic != msg_magic) return bad("bad message magic");
  if (version != protocol_version) return bad("message version " + std::to_string(version) + " is not 1");
  if (h.length != total) return bad("header says " + std::to_string(h.length) + " bytes, message has " + std::to_string(total));
  return h;
}

}  // namespace

bool is_io_opcode(uint16_t op) noexcept { return op >= OP_READ && op <= OP_WRITE_ZEROES; }

const char* opcode_name(uint16_t op) noexcept {
  switch (op) {
    case OP_OPEN: return "OPEN";
    case OP_OPEN_REPLY: return "OPEN_REPLY";
    case OP_READ: return "READ";
    case OP_WRITE: return "WRITE";
    case OP_FLUSH: return "FLUSH";
    case OP_DISCARD: return "DISCARD";
    case OP_WRITE_ZEROES: return "WRITE_ZEROES";
    case OP_FENCE: return "FENCE";
    case OP_REPLY: return "REPLY";
    case OP_LIST: return "LIST";
    case OP_LIST_REPLY: return "LIST_REPLY";
  }
  return "unknown";
}

size_t encode_hello(const conn_hello& h, std::byte* out) {
  writer w(out);
  w.u32(hello_magic);
  w.u16(h.min_version);
  w.u16(h.max_version);
  w.u16(h.queue_depth);
  w.u16(0);
  w.u32(0);
  return w.size();
}

size_t encode_accept(const conn_accept& a, std::byte* out) {
  writer w(out);
  w.u32(hello_magic);
  w.u16(a.version);
  w.u16(a.queue_depth);
  w.u32(static_cast<uint32_t>(a.status));
  w.u32(0);
  return w.size();
}

core::result<conn_hello> decode_hello(std::span<const std::byte> in) {
  reader r(in);
  if (!r.has(hello_size)) return bad("connect request without a 3leaf hello");
  if (r.u32() != hello_magic) return bad("connect request hello has a bad magic");
  conn_hello h;
  h.min_version = r.u16();
  h.max_version = r.u16();
  h.queue_depth = r.u16();
  if (h.min_version > h.max_version) return bad("hello version range is empty");
  return h;
}

core::result<conn_accept> decode_accept(std::span<const std::byte> in) {
  reader r(in);
  if (!r.has(hello_size)) return bad("connection accepted without a 3leaf answer");
  if (r.u32() != hello_magic) return bad("accept answer has a bad magic");
  conn_accept a;
  a.version = r.u16();
  a.queue_depth = r.u16();
  a.status = static_cast<int32_t>(r.u32());
  return a;
}

core::result<msg_hdr> decode_hdr(std::span<const std::byte> in) {
  reader r(in);
  return read_hdr(r, in.size());
}

size_t encode_io(const io_rpc& rpc, std::byte* out) {
  writer w(out);
  put_hdr(w, rpc.hdr.opcode, rpc.hdr.epoch, rpc.hdr.id);
  uint16_t n = std::min<uint16_t>(rpc.nseg, max_segs_per_rpc);
  w.u64(rpc.offset);
  w.u64(rpc.length);
  w.u16(rpc.flags);
  w.u16(n);
  w.u32(0);
  for (uint16_t i = 0; i < n; ++i) {
    w.u64(rpc.segs[i].handle);
    w.u32(rpc.segs[i].offset);
    w.u32(rpc.segs[i].length);
  }
  return finish(w);
}

core::result<void> decode_io(std::span<const std::byte> in, io_rpc* out) {
  reader r(in);
  auto h = read_hdr(r, in.size());
  if (!h) return core::fail(std::move(h).err());
  out->hdr = *h;
  if (!r.has(io_body_size)) return bad("I/O RPC shorter than its body");
  out->offset = r.u64();
  out->length = r.u64();
  out->flags = r.u16();
  out->nseg = r.u16();
  r.skip(4);
  if (out->nseg > max_segs_per_rpc)
    return core::fail(E2BIG, "I/O RPC names " + std::to_string(out->nseg) + " segments, more than " +
                                 std::to_string(max_segs_per_rpc));
  if (r.left() != size_t{out->nseg} * seg_ref_size) return bad("I/O RPC length does not match its segment count");
  for (uint16_t i = 0; i < out->nseg; ++i) {
    out->segs[i].handle = r.u64();
    out->segs[i].offset = r.u32();
    out->segs[i].length = r.u32();
  }
  return core::ok();
}

size_t encode_open(const open_rpc& rpc, std::byte* out) {
  writer w(out);
  put_hdr(w, OP_OPEN, 0, rpc.hdr.id);
  size_t n = std::min(rpc.name.size(), max_export_name);
  w.u16(rpc.flags);
  w.u16(static_cast<uint16_t>(n));
  w.bytes(rpc.name.data(), n);
  return finish(w);
}

core::result<open_rpc> decode_open(std::span<const std::byte> in) {
  reader r(in);
  auto h = read_hdr(r, in.size());
  if (!h) return core::fail(std::move(h).err());
  open_rpc o;
  o.hdr = *h;
  if (!r.has(4)) return bad("OPEN shorter than its body");
  o.flags = r.u16();
  uint16_t n = r.u16();
  if (n > max_export_name || r.left() != n) return bad("OPEN name length does not match the message");
  o.name.resize(n);
  r.bytes(o.name.data(), n);
  if (o.name.find('\0') != std::string::npos) return bad("OPEN name holds a NUL byte");
  return o;
}

size_t encode_open_reply(const open_reply& rep, std::byte* out) {
  writer w(out);
  put_hdr(w, OP_OPEN_REPLY, rep.epoch, rep.hdr.id);
  uint32_t n = std::min(rep.nsegs, max_pool_segments);
  w.u32(static_cast<uint32_t>(rep.status));
  w.u32(rep.block_size);
  w.u64(rep.size);
  w.u64(rep.features);
  w.u32(rep.read_only);
  w.u32(rep.segment_size);
  w.u32(n);
  w.u32(rep.max_segs);
  w.u32(rep.epoch);
  w.u32(0);
  char uuid[uuid_chars] = {};
  std::memcpy(uuid, rep.uuid, strnlen(rep.uuid, uuid_chars));
  w.bytes(uuid, uuid_chars);
  w.zeros(4);
  for (uint32_t i = 0; i < n; ++i) {
    w.u64(rep.pool[i].handle);
    w.u64(rep.pool[i].addr);
    w.u32(rep.pool[i].rkey);
    w.u32(rep.pool[i].length);
  }
  return finish(w);
}

core::result<void> decode_open_reply(std::span<const std::byte> in, open_reply* out) {
  reader r(in);
  auto h = read_hdr(r, in.size());
  if (!h) return core::fail(std::move(h).err());
  if (h->opcode != OP_OPEN_REPLY) return bad(std::string("expected OPEN_REPLY, got ") + opcode_name(h->opcode));
  out->hdr = *h;
  if (!r.has(open_reply_fixed - hdr_size)) return bad("OPEN_REPLY shorter than its body");
  out->status = static_cast<int32_t>(r.u32());
  out->block_size = r.u32();
  out->size = r.u64();
  out->features = r.u64();
  out->read_only = r.u32();
  out->segment_size = r.u32();
  out->nsegs = r.u32();
  out->max_segs = r.u32();
  out->epoch = r.u32();
  r.skip(4);
  r.bytes(out->uuid, uuid_chars);
  out->uuid[uuid_chars] = '\0';
  r.skip(4);
  if (out->nsegs > max_pool_segments || r.left() != size_t{out->nsegs} * pool_entry_size)
    return bad("OPEN_REPLY pool does not match its segment count");
  for (uint32_t i = 0; i < out->nsegs; ++i) {
    out->pool[i].handle = r.u64();
    out->pool[i].addr = r.u64();
    out->pool[i].rkey = r.u32();
    out->pool[i].length = r.u32();
  }
  return core::ok();
}

size_t encode_reply(const reply& rep, std::byte* out) {
  writer w(out);
  put_hdr(w, OP_REPLY, rep.epoch, rep.hdr.id);
  w.u32(static_cast<uint32_t>(rep.status));
  w.u32(rep.epoch);
  return finish(w);
}

core::result<reply> decode_reply(std::span<const std::byte> in) {
  reader r(in);
  auto h = read_hdr(r, in.size());
  if (!h) return core::fail(std::move(h).err());
  if (h->opcode != OP_REPLY) return bad(std::string("expected REPLY, got ") + opcode_name(h->opcode));
  if (r.left() != reply_size - hdr_size) return bad("REPLY of the wrong size");
  reply rep;
  rep.hdr = *h;
  rep.status = static_cast<int32_t>(r.u32());
  rep.epoch = r.u32();
  if (rep.status > 0 || rep.status < -4095) return bad("REPLY status " + std::to_string(rep.status) + " is not 0 or -errno");
  return rep;
}

size_t encode_fence(uint64_t id, uint32_t epoch, std::byte* out) {
  writer w(out);
  put_hdr(w, OP_FENCE, epoch, id);
  return finish(w);
}

size_t encode_list(uint64_t id, std::byte* out) {
  writer w(out);
  put_hdr(w, OP_LIST, 0, id);
  return finish(w);
}

size_t encode_list_reply(uint64_t id, std::span<const list_entry> all, std::byte* out) {
  writer w(out);
  put_hdr(w, OP_LIST_REPLY, 0, id);
  uint32_t n = static_cast<uint32_t>(std::min<size_t>(all.size(), max_list_entries));
  w.u32(static_cast<uint32_t>(all.size()));
  w.u32(n);
  for (uint32_t i = 0; i < n; ++i) {
    char name[64] = {}, uuid[uuid_chars] = {};
    std::memcpy(name, all[i].name.data(), std::min<size_t>(all[i].name.size(), sizeof name - 1));
    std::memcpy(uuid, all[i].uuid.data(), std::min(all[i].uuid.size(), uuid_chars));
    w.bytes(name, sizeof name);
    w.bytes(uuid, sizeof uuid);
    w.u32(all[i].read_only ? 1 : 0);
    w.u64(all[i].size);
  }
  return finish(w);
}

core::result<std::pair<uint32_t, std::vector<list_entry>>> decode_list_reply(std::span<const std::byte> in) {
  reader r(in);
  auto h = read_hdr(r, in.size());
  if (!h) return core::fail(std::move(h).err());
  if (h->opcode != OP_LIST_REPLY) return bad(std::string("expected LIST_REPLY, got ") + opcode_name(h->opcode));
  if (!r.has(8)) return bad("LIST_REPLY shorter than its body");
  uint32_t count = r.u32(), n = r.u32();
  if (n > max_list_entries || n > count || r.left() != size_t{n} * list_entry_size)
    return bad("LIST_REPLY does not match its entry count");
  std::vector<list_entry> out(n);
  for (auto& e : out) {
    char name[64], uuid[uuid_chars];
    r.bytes(name, sizeof name);
    r.bytes(uuid, sizeof uuid);
    e.name.assign(name, strnlen(name, sizeof name));
    e.uuid.assign(uuid, strnlen(uuid, sizeof uuid));
    e.read_only = r.u32() != 0;
    e.size = r.u64();
  }
  return std::pair{count, std::move(out)};
}

}  // namespace uvd::rdma
