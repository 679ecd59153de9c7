// safetensors checkpoints: one file (model.safetensors) or shards with model.safetensors.index.json,
// memory-mapped read-only, dtypes BF16, F16, F32, and U8 as 8-bit weights (others are a clear error).
//
// 8-bit weights (docs/quantization.md): in a file whose `__metadata__` has "ksa.quantization": "q8_0", a U8
// tensor of shape [N, K/32, 34] is the Q8_0 matrix [N, K] (rows of K/32 blocks: an fp16 scale, 32 int8
// quants); its TensorInfo has dtype q8_0 and that logical shape. A U8 tensor elsewhere, another inner
// dimension or another quantization name is an error.
//
// A file is: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:
// [begin, end]}, "__metadata__": {str: str}}, then the data; offsets are relative to the end of the header.
// Checks at open: file and header sizes (N <= 100 MB), valid JSON, no duplicate names, known fields,
// offsets inside the data and non-overlapping, numel x itemsize == end - begin. Gaps are allowed.
//
// Alignment: N need not be a multiple of 8 and real files have tensors at any byte offset, so a tensor's
// `data` may be unaligned. Read it with TensorInfo::get / to_f32 (memcpy), or through AlignedData, which
// copies only when the mapped bytes are not aligned. Never cast `data` to uint16_t* / float* directly.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ksa/dtype.hpp"

namespace ksa {

// The name safetensors uses for a dtype ("BF16", "F16", "F32"; "U8" for q8_0 blocks).
const char* safetensors_dtype_name(DType t);
// The `__metadata__` key that marks a file's U8 tensors as q8_0 weights (value "q8_0").
inline constexpr const char kQuantizationKey[] = "ksa.quantization";

// One tensor: a view into a mapped file, valid while the SafetensorsFile / Checkpoint that made it lives.
struct TensorInfo {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;       // q8_0: the matrix [N, K], not the file's [N, K/32, 34]
  const std::byte* data = nullptr;  // may be unaligned (see above)
  int64_t nbytes = 0;
  int64_t file_offset = 0;  // absolute offset of the data in its file
  std::string file;         // path of the file that holds it

  int64_t numel() const;
  std::string shape_str() const;  // "[2560, 4096]"
  bool aligned(size_t alignment) const { return reinterpret_cast<uintptr_t>(data) % alignment == 0; }
  // Element i as float (unaligned-safe; q8_0: the dequantised weight).
  float get(int64_t i) const;
  // All elements as float.
  std::vector<float> to_f32() const;
};

// The bytes of a tensor at an address aligned to `alignment` (a power of two >= the dtype size): the
// mapped bytes when they are aligned, otherwise a private aligned copy.
class AlignedData {
 public:
  explicit AlignedData(const TensorInfo& t, size_t alignment = 64);
  const void* data() const { return ptr_; }
  bool copied() const { return static_cast<bool>(copy_); }

 private:
  struct Free {
    void operator()(void* p) const;
  };
  std::unique_ptr<void, Free> copy_;
  const void* ptr_ = nullptr;
};

// How a checkpoint's bytes are held in memory.
enum class FileLoad : uint8_t {
  // mmap'ed from the page cache (the default: no copy, pages shared with other processes and the cache).
  // On Linux the mapping is advised MADV_HUGEPAGE: pages that are not in the page cache yet are read into it
  // in 2 MiB folios where the kernel can, and mapped in 2 MiB pages (pages already cached keep the folio
  // size they entered the cache with, e.g. a file written in 4 KiB pieces).
  map,
  // Read (pread) into anonymous memory advised MADV_HUGEPAGE (2 MiB pages whatever the page cache holds), then
  // made read-only. Costs the copy at load and the file's size in process memory. Pieces of the file that were
  // not in the page cache are dropped from it after the copy (POSIX_FADV_DONTNEED: a file read from disk is not
  // held twice); cached ones stay. (llama.cpp's --no-mmap.)
  copy,
};

// One .safetensors file, mmapped (or copied: FileLoad).
class SafetensorsFile {
 public:
  static constexpr uint64_t kMaxHeaderBytes = 100'000'000;

  // Throws ksa::Error naming the file and what is wrong with it.
  static SafetensorsFile open(const std::string& path, FileLoad load = FileLoad::map);

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in file order (by offset)
  const TensorInfo* find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  int64_t file_size() const { return file_size_; }

 private:
  struct Mapping;
  std::shared_ptr<Mapping> map_;
  std::string path_;
  int64_t file_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint directory (docs/ksa.md: The model): model.safetensors, or model-0000N-of-0000M.safetensors with
// model.safetensors.index.json (its weight_map must name, for every tensor, the shard that holds it).
class Checkpoint {
 public:
  static constexpr const char* kSingleFile = "model.safetensors";
  static constexpr const char* kIndexFile = "model.safetensors.index.json";

  // Throws ksa::Error naming the file and the problem.
  static Checkpoint open(const std::string& dir, FileLoad load = FileLoad::map);

  const std::string& dir() const { return dir_; }
  bool sharded() const { return files_.size() > 1 || index_; }
  const std::vector<SafetensorsFile>& files() const { return files_; }
  // Every tensor of every file, sorted by name.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(std::string_view name) const;
  const TensorInfo& at(std::string_view name) const;  // throws when absent
  int64_t total_bytes() const;
  int64_t total_elements() const;

 private:
  std::string dir_;
  bool index_ = false;
  std::vector<SafetensorsFile> files_;
  std::vector<TensorInfo> tensors_;
};

// Writes safetensors files. Tensor data is produced on demand (fill), in slices, so that checkpoints
// larger than memory can be written. A q8_0 tensor is added with its matrix shape [N, K] (K a multiple of 32)
// and written as U8 [N, K/32, 34]; every file of such a checkpoint gets "ksa.quantization": "q8_0".
class SafetensorsWriter {
 public:
  // Writes units [first, first + n) of the tensor into dst: elements (n * dtype_size bytes), or for q8_0
  // blocks of 32 weights in row order (n * 34 bytes).
  using Fill = std::function<void(int64_t first, int64_t n, void* dst)>;

  void add(std::string name, DType dtype, std::vector<int64_t> shape, Fill fill);
  // Copies the data now: dtype_bytes(dtype, numel) bytes.
  void add(std::string name, DType dtype, std::vector<int64_t> shape, const void* data);
  void set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }
  // Lets every fill be called from up to n threads at once on disjoint ranges (a slice is cut into n parts):
  // only for fills that allow it (e.g. counter-based random data). Default 1.
  void set_fill_threads(int n) { fill_threads_ = n < 1 ? 1 : n; }

  // One file. The header is padded with spaces to a multiple of `header_align` (8 as HF writes; 1 leaves
  // it unpadded, which tests use to make every tensor unaligned).
  void write_file(const std::string& path, size_t header_align = 8) const;
  // A checkpoint directory: model.safetensors when the data fits in max_shard_bytes, otherwise shards
  // model-0000N-of-0000M.safetensors and model.safetensors.index.json. Returns the files written.
  std::vector<std::string> write_checkpoint(const std::string& dir, int64_t max_shard_bytes) const;

  int64_t total_bytes() const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    Fill fill;
    int64_t nbytes = 0;
  };
  void write_entries(const std::string& path, const std::vector<const Entry*>& entries, size_t header_align) const;
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
  int fill_threads_ = 1;
};

}  // namespace ksa
