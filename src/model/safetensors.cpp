// safetensors reading (mmap, header checks), checkpoint directories (single file or sharded) and writing.
#include "ksa/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <thread>

#include "json_fields.hpp"
#include "ksa/enum_name.hpp"
#include "ksa/error.hpp"

namespace ksa {

namespace fs = std::filesystem;
using detail::Json;

// q8_0 is stored as bytes [N, K/32, 34].
const char* safetensors_dtype_name(DType t) { return enum_name(t, {"F32", "BF16", "F16", "U8"}); }

namespace {

bool parse_st_dtype(const std::string& s, DType& out) {
  if (s == "BF16") out = DType::bf16;
  else if (s == "F16") out = DType::f16;
  else if (s == "F32") out = DType::f32;
  else return false;
  return true;
}

std::string quote(std::string_view s) {
  std::string r(1, '"');
  r.append(s);
  r += '"';
  return r;
}

constexpr int64_t kMaxDimSize = int64_t(1) << 40;

// The writer's unit of a tensor's data: an element, or for q8_0 a block of 32 weights.
int64_t unit_bytes(DType t) { return t == DType::q8_0 ? kQ8_0BlockBytes : dtype_size(t); }

}  // namespace

// --- TensorInfo ---

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorInfo::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

float TensorInfo::get(int64_t i) const {
  if (dtype == DType::q8_0) return load_q8_0(data, i);
  if (dtype == DType::f32) {
    float f;
    std::memcpy(&f, data + i * 4, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, data + i * 2, 2);
  return dtype == DType::bf16 ? bf16::to_float(h) : f16::to_float(h);
}

std::vector<float> TensorInfo::to_f32() const {
  std::vector<float> out(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < int64_t(out.size()); ++i) out[size_t(i)] = get(i);
  return out;
}

void AlignedData::Free::operator()(void* p) const { std::free(p); }

AlignedData::AlignedData(const TensorInfo& t, size_t alignment) {
  const size_t item = t.dtype == DType::q8_0 ? 1 : size_t(dtype_size(t.dtype));  // q8_0: read byte-wise
  if (alignment < item || (alignment & (alignment - 1)) != 0)
    fail("AlignedData: alignment must be a power of two >= ", item, " (got ", alignment, ")");
  if (t.aligned(alignment)) {
    ptr_ = t.data;
    return;
  }
  const size_t bytes = (size_t(t.nbytes) + alignment - 1) / alignment * alignment;
  void* p = std::aligned_alloc(alignment, bytes ? bytes : alignment);
  if (!p) fail("AlignedData: cannot allocate ", bytes, " bytes for ", t.name);
  std::memcpy(p, t.data, size_t(t.nbytes));
  copy_.reset(p);
  ptr_ = p;
}

// --- SafetensorsFile ---

struct SafetensorsFile::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr && size) munmap(addr, size);
  }
};

namespace {
// FileLoad::copy: the file's bytes in anonymous memory from a 2 MiB boundary, advised MADV_HUGEPAGE, read in
// pieces of 64 MiB; made read-only. The page cache is left as it was found: a piece none of whose pages were
// cached before (mincore) is dropped from it after the copy (POSIX_FADV_DONTNEED), so that a file read from
// disk is not held twice, while a cached file stays cached for the next run. Returns the mapping (size rounded
// up to 2 MiB) or throws.
void* copy_file(int fd, size_t size, const std::string& path, size_t& mapped) {
  constexpr size_t kHuge = size_t(2) << 20, kPiece = size_t(64) << 20;
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> cached((size + page - 1) / page, 1);  // unknown: kept
  if (void* m = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0); m != MAP_FAILED) {
    if (mincore(m, size, cached.data()) != 0) std::fill(cached.begin(), cached.end(), 1);
    munmap(m, size);
  }
  const size_t len = (size + kHuge - 1) / kHuge * kHuge;
  void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) fail(path, ": cannot allocate ", size, " bytes for a copy: ", std::strerror(errno));
  // Trim to a 2 MiB boundary (the kernel backs a region with 2 MiB pages where it is so aligned).
  const auto r = reinterpret_cast<uintptr_t>(raw), a = (r + kHuge - 1) / kHuge * kHuge;
  if (a > r) munmap(raw, a - r);
  if (a + len < r + len + kHuge) munmap(reinterpret_cast<void*>(a + len), r + len + kHuge - (a + len));
  auto* p = reinterpret_cast<char*>(a);
#ifdef MADV_HUGEPAGE
  madvise(p, len, MADV_HUGEPAGE);  // advice only: without THP the copy is made in 4 KiB pages
#endif
  for (size_t off = 0; off < size;) {
    const size_t want = std::min(kPiece, size - off);
    size_t got = 0;
    while (got < want) {
      const ssize_t n = ::pread(fd, p + off + got, want - got, off_t(off + got));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const int e = n < 0 ? errno : 0;
        munmap(p, len);
        fail(path, ": read failed at byte ", off + got, ": ", e ? std::strerror(e) : "unexpected end of file");
      }
      got += size_t(n);
    }
    if (std::none_of(cached.begin() + off / page, cached.begin() + (off + want + page - 1) / page,
                     [](unsigned char c) { return c & 1; }))
      posix_fadvise(fd, off_t(off), off_t(want), POSIX_FADV_DONTNEED);
    off += want;
  }
  mprotect(p, len, PROT_READ);
  mapped = len;
  return p;
}
}  // namespace

SafetensorsFile SafetensorsFile::open(const std::string& path, FileLoad load) {
  SafetensorsFile f;
  f.path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    fail(path, ": cannot stat: ", std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": not a regular file");
  }
  f.file_size_ = int64_t(st.st_size);
  f.map_ = std::make_shared<Mapping>();
  if (st.st_size > 0 && load == FileLoad::copy) {
    try {
      f.map_->addr = copy_file(fd, size_t(st.st_size), path, f.map_->size);
    } catch (...) {
      ::close(fd);
      throw;
    }
  } else if (st.st_size > 0) {
    void* a = mmap(nullptr, size_t(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
    if (a == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      fail(path, ": mmap failed: ", std::strerror(e));
    }
#ifdef MADV_HUGEPAGE
    // Pages not yet in the page cache are then read in 2 MiB folios and mapped in 2 MiB pages (FileLoad::map).
    madvise(a, size_t(st.st_size), MADV_HUGEPAGE);
#endif
    f.map_->addr = a;
    f.map_->size = size_t(st.st_size);
  }
  ::close(fd);

  const auto* base = static_cast<const std::byte*>(f.map_->addr);
  const uint64_t size = uint64_t(f.file_size_);
  if (size < 8) fail(path, ": file is ", size, " bytes, too short for the 8-byte header length");
  uint8_t lb[8];
  std::memcpy(lb, base, 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | lb[i];  // little-endian
  if (n > kMaxHeaderBytes) fail(path, ": header length ", n, " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  if (n > size - 8) fail(path, ": header length ", n, " runs past the end of the file (", size, " bytes)");
  if (n < 2) fail(path, ": header length ", n, " is too small for a JSON object");
  const char* htext = reinterpret_cast<const char*>(base + 8);

  // Parse, catching duplicate keys at the top level (nlohmann would keep the last silently).
  std::set<std::string> seen;
  std::string dup;
  const Json header = detail::parse_json(std::string_view(htext, size_t(n)), path, "header is not valid JSON",
                                         [&](int depth, Json::parse_event_t ev, Json& parsed) {
                                           if (ev == Json::parse_event_t::key && depth == 1 && parsed.is_string()) {
                                             if (!seen.insert(parsed.get<std::string>()).second && dup.empty())
                                               dup = parsed.get<std::string>();
                                           }
                                           return true;
                                         });
  if (!dup.empty()) fail(path, ": header names tensor ", quote(dup), " twice");
  if (!header.is_object()) fail(path, ": header must be a JSON object (got ", detail::json_excerpt(header), ")");

  const uint64_t data_begin = 8 + n;
  const uint64_t data_size = size - data_begin;
  // The metadata first: it says how U8 tensors are to be read.
  if (auto md = header.find("__metadata__"); md != header.end()) {
    const Json& v = *md;
    if (!v.is_object()) fail(path, ": __metadata__ must be an object of strings (got ", detail::json_excerpt(v), ")");
    for (auto m = v.begin(); m != v.end(); ++m) {
      if (!m.value().is_string())
        fail(path, ": __metadata__.", m.key(), " must be a string (got ", detail::json_excerpt(m.value()), ")");
      f.metadata_[m.key()] = m.value().get<std::string>();
    }
  }
  const auto quant = f.metadata_.find(kQuantizationKey);
  if (quant != f.metadata_.end() && quant->second != "q8_0")
    fail(path, ": __metadata__.", kQuantizationKey, " is ", quote(quant->second), "; only \"q8_0\" is supported");
  const bool q8_0 = quant != f.metadata_.end();
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const Json& v = it.value();
    if (name == "__metadata__") continue;
    const std::string where = path + ": tensor " + quote(name);
    if (!v.is_object())
      fail(where, ": must be an object with dtype, shape, data_offsets (got ", detail::json_excerpt(v), ")");
    for (auto k = v.begin(); k != v.end(); ++k)
      if (k.key() != "dtype" && k.key() != "shape" && k.key() != "data_offsets")
        fail(where, ": unknown field ", quote(k.key()));
    auto dt = v.find("dtype");
    auto sh = v.find("shape");
    auto off = v.find("data_offsets");
    if (dt == v.end() || !dt->is_string()) fail(where, ": dtype must be a string");
    if (sh == v.end() || !sh->is_array()) fail(where, ": shape must be a list of integers");
    if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      fail(where, ": data_offsets must be [begin, end], two non-negative integers (got ",
           off == v.end() ? std::string("nothing") : detail::json_excerpt(*off), ")");
    TensorInfo t;
    t.name = name;
    t.file = path;
    const std::string dts = dt->get<std::string>();
    const bool bytes = dts == "U8";  // q8_0 blocks (docs/quantization.md), checked below
    if (bytes && !q8_0)
      fail(where, ": dtype \"U8\" is read only as 8-bit weights, and the header's __metadata__ has no \"",
           kQuantizationKey, "\": \"q8_0\"");
    if (bytes) t.dtype = DType::q8_0;
    else if (!parse_st_dtype(dts, t.dtype))
      fail(where, ": dtype ", quote(dts), " is not supported (BF16, F16 or F32; U8 as q8_0 weights)");
    uint64_t numel = 1;
    for (const Json& d : *sh) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > uint64_t(kMaxDimSize))
        fail(where, ": shape must be a list of non-negative integers (got ", detail::json_excerpt(*sh), ")");
      const uint64_t x = d.get<uint64_t>();
      t.shape.push_back(int64_t(x));
      if (x != 0 && numel > uint64_t(kMaxDimSize) * 16 / x)
        fail(where, ": shape ", detail::json_excerpt(*sh), " is too large");
      numel *= x;
    }
    const uint64_t b = (*off)[0].get<uint64_t>(), e = (*off)[1].get<uint64_t>();
    if (b > e) fail(where, ": data_offsets [", b, ", ", e, "] end before they begin");
    if (e > data_size)
      fail(where, ": data_offsets [", b, ", ", e, "] run past the end of the data (", data_size,
           " bytes after the header)");
    if (bytes) {
      // [N, K/32, 34] bytes: N rows of K/32 blocks; the tensor is the q8_0 matrix [N, K].
      if (t.shape.size() != 3 || t.shape[2] != kQ8_0BlockBytes)
        fail(where, ": a q8_0 tensor (U8) must have shape [N, K/32, 34], rows of 34-byte blocks (got ", t.shape_str(),
             ")");
      if (numel != e - b)
        fail(where, ": q8_0 shape ", t.shape_str(), " (the matrix [", t.shape[0], ", ", t.shape[1] * kQ8_0Block,
             "]) needs ", t.shape[0], " x ", t.shape[1], " x 34 = ", numel, " bytes but data_offsets [", b, ", ", e,
             "] span ", e - b);
      t.shape = {t.shape[0], t.shape[1] * kQ8_0Block};
    } else {
      const uint64_t need = numel * uint64_t(dtype_size(t.dtype));
      if (need != e - b)
        fail(where, ": shape ", t.shape_str(), " of ", dts, " needs ", need, " bytes but data_offsets [", b, ", ", e,
             "] span ", e - b);
    }
    t.nbytes = int64_t(e - b);
    t.file_offset = int64_t(data_begin + b);
    t.data = base + data_begin + b;
    f.tensors_.push_back(std::move(t));
  }
  std::sort(f.tensors_.begin(), f.tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.file_offset != b.file_offset ? a.file_offset < b.file_offset : a.nbytes < b.nbytes;
  });
  const TensorInfo* last = nullptr;  // the non-empty tensor that ends furthest so far
  for (const TensorInfo& b : f.tensors_) {
    if (b.nbytes == 0) continue;
    if (last && b.file_offset < last->file_offset + last->nbytes) {
      const int64_t d = int64_t(data_begin);
      fail(path, ": tensors ", quote(last->name), " [", last->file_offset - d, ", ",
           last->file_offset - d + last->nbytes, ") and ", quote(b.name), " [", b.file_offset - d, ", ",
           b.file_offset - d + b.nbytes, ") overlap");
    }
    if (!last || b.file_offset + b.nbytes > last->file_offset + last->nbytes) last = &b;
  }
  return f;
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  for (const TensorInfo& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

// --- Checkpoint ---

Checkpoint Checkpoint::open(const std::string& dir, FileLoad load) {
  Checkpoint c;
  c.dir_ = dir;
  // std::filesystem's error_code forms throughout: a path it cannot stat (a name over NAME_MAX, a loop)
  // must end in ksa::Error, not filesystem_error.
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    fail(dir, ": not a directory", ec && ec != std::errc::no_such_file_or_directory ? " (" + ec.message() + ")" : "");
  const fs::path index = fs::path(dir) / kIndexFile;
  const fs::path single = fs::path(dir) / kSingleFile;
  std::map<std::string, std::string> weight_map;  // tensor -> shard file name
  if (fs::exists(index, ec)) {
    c.index_ = true;
    const std::string ipath = index.string();
    const Json j = detail::parse_json(detail::read_text_file(ipath, "the safetensors index"), ipath);
    const detail::Fields f(j, ipath);
    const Json& wm = f.at("weight_map");
    if (!wm.is_object()) f.bad("weight_map", "an object {tensor: file}", wm);
    std::vector<std::string> shard_names;
    for (auto it = wm.begin(); it != wm.end(); ++it) {
      if (!it.value().is_string())
        fail(ipath, ": weight_map.", it.key(), ": must be a file name (got ", detail::json_excerpt(it.value()), ")");
      const std::string file = it.value().get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
        fail(ipath, ": weight_map.", it.key(), ": ", quote(file),
             " must be a plain file name in the checkpoint directory");
      weight_map[it.key()] = file;
      if (std::find(shard_names.begin(), shard_names.end(), file) == shard_names.end()) shard_names.push_back(file);
    }
    if (weight_map.empty()) fail(ipath, ": weight_map is empty");
    std::sort(shard_names.begin(), shard_names.end());
    for (const std::string& s : shard_names) {
      const fs::path p = fs::path(dir) / s;
      if (!fs::exists(p, ec))
        fail(ipath, ": weight_map names ", quote(s),
             ec && ec != std::errc::no_such_file_or_directory ? ", which cannot be read: " + ec.message()
                                                              : ", which does not exist in " + dir);
      c.files_.push_back(SafetensorsFile::open(p.string(), load));
    }
  } else if (fs::exists(single, ec)) {
    c.files_.push_back(SafetensorsFile::open(single.string(), load));
  } else {
    fail(dir, ": no ", kSingleFile, " or ", kIndexFile);
  }

  std::map<std::string, const std::string*> where;  // tensor -> file path
  for (const SafetensorsFile& f : c.files_) {
    const std::string fname = fs::path(f.path()).filename().string();
    for (const TensorInfo& t : f.tensors()) {
      auto [it, fresh] = where.emplace(t.name, &f.path());
      if (!fresh) fail(dir, ": tensor ", quote(t.name), " is in both ", *it->second, " and ", f.path());
      if (c.index_) {
        auto w = weight_map.find(t.name);
        if (w == weight_map.end())
          fail(f.path(), ": tensor ", quote(t.name), " is not in the weight_map of ", kIndexFile);
        if (w->second != fname)
          fail(f.path(), ": tensor ", quote(t.name), " is here but ", kIndexFile, " maps it to ", quote(w->second));
      }
      c.tensors_.push_back(t);
    }
  }
  for (const auto& [name, file] : weight_map)
    if (!where.count(name))
      fail((fs::path(dir) / file).string(), ": has no tensor ", quote(name), " (", kIndexFile, " maps it there)");
  std::sort(c.tensors_.begin(), c.tensors_.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
  return c;
}

const TensorInfo* Checkpoint::find(std::string_view name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const TensorInfo& t, std::string_view n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

const TensorInfo& Checkpoint::at(std::string_view name) const {
  const TensorInfo* t = find(name);
  if (!t) fail(dir_, ": no tensor ", quote(name));
  return *t;
}

int64_t Checkpoint::total_bytes() const {
  int64_t n = 0;
  for (const TensorInfo& t : tensors_) n += t.nbytes;
  return n;
}

int64_t Checkpoint::total_elements() const {
  int64_t n = 0;
  for (const TensorInfo& t : tensors_) n += t.numel();
  return n;
}

// --- SafetensorsWriter ---

void SafetensorsWriter::add(std::string name, DType dtype, std::vector<int64_t> shape, Fill fill) {
  for (const Entry& e : entries_)
    if (e.name == name) fail("safetensors writer: tensor ", quote(name), " added twice");
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) fail("safetensors writer: tensor ", quote(name), ": negative dimension ", d);
    n *= d;
  }
  if (dtype == DType::q8_0 && (shape.size() != 2 || shape[1] % kQ8_0Block != 0))
    fail("safetensors writer: tensor ", quote(name), ": a q8_0 tensor is a matrix [N, K] with K a multiple of ",
         kQ8_0Block, " (got ", shape.size(), " dimensions",
         shape.size() == 2 ? ", K " + std::to_string(shape[1]) : std::string(), ")");
  entries_.push_back(Entry{std::move(name), dtype, std::move(shape), std::move(fill), dtype_bytes(dtype, n)});
}

void SafetensorsWriter::add(std::string name, DType dtype, std::vector<int64_t> shape, const void* data) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  auto copy = std::make_shared<std::vector<std::byte>>(size_t(dtype_bytes(dtype, n)));
  if (!copy->empty()) std::memcpy(copy->data(), data, copy->size());
  const int64_t item = unit_bytes(dtype);
  add(std::move(name), dtype, std::move(shape), [copy, item](int64_t first, int64_t cnt, void* dst) {
    std::memcpy(dst, copy->data() + first * item, size_t(cnt * item));
  });
}

int64_t SafetensorsWriter::total_bytes() const {
  int64_t n = 0;
  for (const Entry& e : entries_) n += e.nbytes;
  return n;
}

void SafetensorsWriter::write_entries(const std::string& path, const std::vector<const Entry*>& entries,
                                      size_t header_align) const {
  nlohmann::ordered_json h;
  std::map<std::string, std::string> meta = metadata_;
  // Every file of a checkpoint with q8_0 tensors says so (a reader takes U8 tensors as q8_0 only then).
  for (const Entry& e : entries_)
    if (e.dtype == DType::q8_0) meta[kQuantizationKey] = "q8_0";
  if (!meta.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : meta) m[k] = v;
    h["__metadata__"] = m;
  }
  int64_t off = 0;
  for (const Entry* e : entries) {
    const std::vector<int64_t> shape =
        e->dtype == DType::q8_0 ? std::vector<int64_t>{e->shape[0], e->shape[1] / kQ8_0Block, kQ8_0BlockBytes}
                                : e->shape;
    h[e->name] = {
        {"dtype", safetensors_dtype_name(e->dtype)}, {"shape", shape}, {"data_offsets", {off, off + e->nbytes}}};
    off += e->nbytes;
  }
  std::string text = h.dump();
  if (header_align > 1)
    while ((8 + text.size()) % header_align) text.push_back(' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail(path, ": cannot create");
  // Every write but the last ends at a multiple of 2 MiB in the file (the bytes after it wait in `pending`):
  // the page cache then holds the file in 2 MiB folios where it can (Linux with large folios), which a reader
  // maps with 2 MiB pages. A write that ends inside a 2 MiB range leaves that range in small folios, the next
  // write filling it adds more: written in 16 MiB slices as they came, 3.37 of a 4.27 GB checkpoint was held
  // in 2 MiB folios (docs/quantization.md). Only the bytes around the boundaries pass through `pending` (< 2
  // MiB per call): it is completed to the next boundary from the new bytes and written, then the new bytes up
  // to their last boundary are written from where they are.
  constexpr int64_t kAlign = int64_t(2) << 20;
  std::vector<std::byte> pending;
  int64_t written = 0;  // a multiple of kAlign until the last call
  auto put = [&](const std::byte* q, int64_t n) {
    out.write(reinterpret_cast<const char*>(q), std::streamsize(n));
    written += n;
  };
  auto emit = [&](const void* p, size_t bytes, bool last) {
    const auto* b = static_cast<const std::byte*>(p);
    const auto* e = b + bytes;
    const int64_t end = written + int64_t(pending.size()) + int64_t(bytes);
    const int64_t upto = last ? end : end / kAlign * kAlign;
    if (upto > written && !pending.empty()) {
      const int64_t take = std::min<int64_t>(e - b, std::min(upto, written + kAlign) - written - int64_t(pending.size()));
      pending.insert(pending.end(), b, b + take);
      b += take;
      put(pending.data(), int64_t(pending.size()));
      pending.clear();
    }
    if (upto > written) {
      const int64_t n = upto - written;
      put(b, n);
      b += n;
    }
    pending.insert(pending.end(), b, e);
  };
  out.rdbuf()->pubsetbuf(nullptr, 0);  // unbuffered: each write() as emit cuts it
  uint8_t lb[8];
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) lb[i] = uint8_t(n >> (8 * i));
  emit(lb, 8, false);
  emit(text.data(), text.size(), false);
  constexpr int64_t kSliceBytes = 16 << 20;
  std::vector<std::byte> buf;
  for (const Entry* e : entries) {
    const int64_t item = unit_bytes(e->dtype), units = e->nbytes / item;
    const int64_t slice = std::max<int64_t>(1, kSliceBytes / item);
    for (int64_t first = 0; first < units; first += slice) {
      const int64_t cnt = std::min(slice, units - first);
      buf.resize(size_t(cnt * item));
      const int64_t parts = std::min<int64_t>(fill_threads_, cnt / 4096 + 1);
      if (parts <= 1) {
        e->fill(first, cnt, buf.data());
      } else {  // disjoint ranges of the slice, one thread each (set_fill_threads)
        std::vector<std::thread> threads;
        std::exception_ptr error;
        std::mutex error_mutex;
        for (int64_t t = 0; t < parts; ++t) {
          const int64_t a = cnt * t / parts, b = cnt * (t + 1) / parts;
          threads.emplace_back([&, a, b] {
            try {
              e->fill(first + a, b - a, buf.data() + a * item);
            } catch (...) {
              const std::lock_guard<std::mutex> lock(error_mutex);
              if (!error) error = std::current_exception();
            }
          });
        }
        for (std::thread& th : threads) th.join();
        if (error) std::rethrow_exception(error);
      }
      emit(buf.data(), buf.size(), false);
    }
  }
  emit(nullptr, 0, true);
  out.flush();
  if (!out) fail(path, ": write error");
}

void SafetensorsWriter::write_file(const std::string& path, size_t header_align) const {
  std::vector<const Entry*> all;
  for (const Entry& e : entries_) all.push_back(&e);
  write_entries(path, all, header_align);
}

std::vector<std::string> SafetensorsWriter::write_checkpoint(const std::string& dir, int64_t max_shard_bytes) const {
  fs::create_directories(dir);
  std::vector<std::vector<const Entry*>> shards(1);
  int64_t cur = 0;
  for (const Entry& e : entries_) {
    if (cur > 0 && cur + e.nbytes > max_shard_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(&e);
    cur += e.nbytes;
  }
  // Remove what an earlier write may have left, so that the directory has one layout.
  std::error_code ec;
  fs::remove(fs::path(dir) / Checkpoint::kSingleFile, ec);
  fs::remove(fs::path(dir) / Checkpoint::kIndexFile, ec);
  for (const auto& de : fs::directory_iterator(dir)) {
    const std::string n = de.path().filename().string();
    if (n.rfind("model-", 0) == 0 && n.size() > 12 && n.substr(n.size() - 12) == ".safetensors")
      fs::remove(de.path(), ec);
  }
  std::vector<std::string> written;
  if (shards.size() == 1) {
    const std::string p = (fs::path(dir) / Checkpoint::kSingleFile).string();
    write_entries(p, shards[0], 8);
    written.push_back(p);
    return written;
  }
  nlohmann::ordered_json wm = nlohmann::ordered_json::object();
  char name[64];
  for (size_t i = 0; i < shards.size(); ++i) {
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    const std::string p = (fs::path(dir) / name).string();
    write_entries(p, shards[i], 8);
    written.push_back(p);
    for (const Entry* e : shards[i]) wm[e->name] = name;
  }
  nlohmann::ordered_json idx;
  idx["metadata"] = {{"total_size", total_bytes()}};
  idx["weight_map"] = wm;
  const std::string ip = (fs::path(dir) / Checkpoint::kIndexFile).string();
  std::ofstream out(ip, std::ios::trunc);
  out << idx.dump(2) << "\n";
  if (!out) fail(ip, ": write error");
  written.push_back(ip);
  return written;
}

}  // namespace ksa
