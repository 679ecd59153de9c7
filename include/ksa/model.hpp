// The Qwen3-KSA forward on the CPU (docs/ksa.md: The model): a loaded checkpoint, one compressed KV cache per layer,
// and sequences that grow by appending text tokens. The model calls the attention kernels (ksa/cpu.hpp for a
// prefill, ksa/decode.hpp through the cache afterwards) and the dense operations (ksa/dense.hpp); it never
// re-implements either.
//
// Stream: appending text tokens also runs the summary tokens the stream defines (docs/ksa.md: The stream): after the
// k-th text token of a chunk, its S summary tokens (ids summary_token_begin + j), in the same call. A trailing partial
// chunk has no summary yet (summarize_tail is off in inference).
//
// Numerics: activations fp32; weights read in their file dtype (bf16 in the released files, never widened
// as a whole); q, k, v and the attention output are rounded to the KV cache's dtype (bf16 by default, as in
// the reference bf16 inference; f32 for tight comparisons), so a prefill and step-by-step decoding see the
// same cached values.
//
// Layers whose `summary_layer_freq` entry is 0 run causal attention over the text only (their W is set past
// the context limit, so no text query sees a summary) and leave the summary tokens' hidden states unchanged.
// A config with use_summary_attention false is plain Qwen3: the stream holds no summary tokens.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "ksa/cache.hpp"
#include "ksa/dtype.hpp"
#include "ksa/model_config.hpp"
#include "ksa/safetensors.hpp"
#include "ksa/sampler.hpp"
#include "ksa/weights.hpp"

namespace ksa {

// The storage types of a checkpoint's matrices, and of its vectors when they differ: "bf16",
// "q8_0 (norms bf16)" (docs/quantization.md), "q8_0/bf16 (norms bf16)" when some matrices were kept in bf16.
std::string describe_weight_format(const Checkpoint& ckpt);

// Where the model runs: the CPU, or the current CUDA device (a build with CUDA and a visible GPU).
enum class Device : uint8_t { cpu, cuda };
const char* to_string(Device d);
// Whether Device::cuda can be used: the build has the CUDA engine and a GPU is visible. Never throws.
bool cuda_engine_available();
// The device a model with this config runs on by default: CUDA when cuda_engine_available() and the CUDA
// engine takes the config (head_dim 64 or 128), else the CPU.
Device default_device(const ModelConfig& cfg);
// The device the checkpoint in `dir` runs on by default: default_device(its config), except that 8-bit
// (q8_0) weights run on the CPU. Reads config.json and, when CUDA is available, the safetensors headers.
Device default_device(const std::string& dir);

struct ModelOptions {
  Device device = Device::cpu;
  int threads = 0;               // CPU worker threads for matrix products and attention (0 = all cores)
  int64_t max_text_tokens = 0;   // context limit per sequence (0 = config.max_position_embeddings)
  DType kv_dtype = DType::bf16;  // KV cache storage: bf16 or f32 (CUDA: bf16)
  // Called while the weights are read into memory (bytes done, bytes total); may be empty.
  std::function<void(int64_t, int64_t)> progress;
  // CUDA: steps that only continue sequences (decode, continuation chunks) replay a CUDA graph of the whole
  // forward, captured the second time a step of the same shape runs (docs/engine.md).
  bool cuda_graphs = true;
  // CUDA: matrix products of at most 8 rows (decode of a few sequences) through ksa's own GEMV kernel, which
  // reads the weights at memory bandwidth; false: cuBLASLt for every product.
  bool cuda_gemv = true;
  // CUDA: each class of cuBLASLt products (rows rounded up to a power of two, K, N) runs the fastest of
  // cuBLASLt's first 8 candidates, timed at its first use (a few ms once per class), instead of cuBLASLt's
  // first choice. The choice can differ from run to run where two candidates are about as fast.
  bool cuda_gemm_autotune = false;
  // CUDA: the GEMV kernel's block shape for batch-1 products (an index of the shapes `ksa bench-gemm
  // --gemv-shape` compares; 0 = the default).
  int cuda_gemv_shape = 0;
  // CUDA: while a step runs on the device, plan the next step's decode on the host (each sequence of the step
  // continued by one token) and queue its uploads; the next step uses those plans when it is that step, else
  // plans anew. Hides the host's planning (36 layers' plans) under the device's work (docs/engine.md).
  bool cuda_plan_ahead = true;
  // CUDA: text tokens per prefill piece (0 = kDefaultPrefillTokens). A longer prompt runs in pieces, each
  // attending over the cache and itself, so that activation memory follows the piece, not the prompt. The CPU
  // prefills a prompt in one piece.
  static constexpr int64_t kDefaultPrefillTokens = 2048;
  int64_t prefill_tokens = 0;
  // CPU: every matrix product row by row through the matrix-vector kernel (cpu::linear's batch_invariant), so
  // that a sequence's logits do not depend on the other sequences of a step: the same tokens alone and under
  // any load, at the price of prefill speed (W read once per 4 rows). Off, products of >= 12 rows go through
  // OpenBLAS sgemm, whose rounding differs from the matrix-vector kernel's: a near-tie can then go either way.
  // CUDA: refused at load.
  bool batch_invariant = false;
  // CPU: how the checkpoint's bytes are held (ksa/safetensors.hpp): mapped from the page cache (default), or
  // copied into anonymous memory in 2 MiB pages (FileLoad::copy: load time and the weights' size in process
  // memory, for decode that does not depend on how the page cache holds the file). CUDA: always mapped.
  FileLoad load = FileLoad::map;
};

// Which logits an append returns.
enum class LogitsFor : uint8_t {
  none,  // none (e.g. a prompt whose continuation is not sampled)
  last,  // the last appended text token: [1, vocab]
  all,   // every appended text token: [n, vocab]
};

// One sequence's part of a batched step (Model::step).
struct StepItem {
  SeqId id = -1;
  std::span<const int32_t> tokens;     // new text tokens, >= 1 (a prompt chunk, or one token)
  LogitsFor logits = LogitsFor::none;  // logits returned in StepResult::logits
  // Non-null: the next token is drawn from the last token's logits with this configuration (penalties over
  // `history`). The draw is reproducible: the u in [0, 1) it uses is a hash of (seed, the sequence's number
  // of draws so far), so the same seed gives the same tokens on the same backend, whatever else is batched.
  const SamplerConfig* sampler = nullptr;
  std::span<const int32_t> history;  // tokens the penalties look at (prompt and generated so far)
};

// What Model::step returns, item by item.
struct StepResult {
  std::vector<int32_t> next;        // sampled token per item, -1 where none was asked for
  std::vector<float> logits;        // the requested rows, item after item: [rows, vocab()]
  std::vector<int64_t> logits_row;  // per item: its first row in `logits` (rows: 0, 1 or tokens.size())
};

// Time of the steps that replayed a CUDA graph, summed over those steps (Model::replay_times; ksa bench model
// prints the means). Host clocks for the host's parts, CUDA events for the device's.
struct ReplayTimes {
  int64_t steps = 0;
  double wall = 0;                // host: from the backend's start of the step to the end of its wait
  double host_before_launch = 0;  // host: from the start of the step to the graph's launch (planning, uploads)
  double host_between = 0;        // host: from the end of the step before to the start of this one (the model)
  double host_ahead = 0;          // host: planning the next step's decode during this one (plan ahead)
  double host_wait = 0;           // host: waiting for the device at the end of the step
  double device = 0;              // device: the step's first upload to its last copy back (sampling included)
  double graph = 0;               // device: the graph alone
  double before_graph = 0;        // device: from the step's start to the graph's start (uploads, waits, host)
  double after_graph = 0;         // device: from the graph's end to the step's end (sampling, copies, host)
  double ahead_uploads = 0;       // device: from the end of the step before's launches to this step's plans landing
                                  // (negative: they landed under the step before's graph)
  int64_t ahead_late = 0;         // steps that started before the plans made for them had landed

  // *this += b - a, field by field (what the steps between two readings a and b added).
  void add_difference(const ReplayTimes& a, const ReplayTimes& b) {
    steps += b.steps - a.steps;
    ahead_late += b.ahead_late - a.ahead_late;
    for (double ReplayTimes::*f :
         {&ReplayTimes::wall, &ReplayTimes::host_before_launch, &ReplayTimes::host_between, &ReplayTimes::host_ahead,
          &ReplayTimes::host_wait, &ReplayTimes::device, &ReplayTimes::graph, &ReplayTimes::before_graph,
          &ReplayTimes::after_graph, &ReplayTimes::ahead_uploads})
      this->*f += b.*f - a.*f;
  }
};

// How the steps of a CUDA engine ran with CUDA graphs (Model::graph_stats; zeros on the CPU or without graphs):
// replayed, launched kernel by kernel, or captured, and why. A step continuing sequences only is replayed from
// its shape's graph (rows, summary rows, logits rows, sequences) while that graph fits; its shape's first step
// runs eagerly, the second is captured.
struct GraphStats {
  int64_t replays = 0;
  int64_t eager_prompt = 0;  // eager: a prompt piece in the step (the prefill kernel's launch depends on it)
  int64_t eager_first = 0;   // eager: the first step of its shape
  int64_t captures = 0;      // = the causes below
  int64_t new_shape = 0;     // the shape's second step
  int64_t arena_moved = 0;   // the activation arena grew since the shape's graph was captured
  int64_t plans_moved = 0;   // a cache's decode plan workspace grew
  int64_t over_units = 0;    // the step's attention work outgrew the graph's grid
  int64_t other_slot = 0;    // its graph had no copy for the plan workspace slot the step fell on
  int64_t cleared = 0;       // times the graphs of 64 shapes were all dropped to start over
};

class Model {
 public:
  // Reads DIR/config.json and the safetensors (single file or sharded), checks every tensor against the
  // weight table, and pages the weights in (mmap; progress through opt.progress). Throws ksa::Error
  // naming the file and the problem. 8-bit (q8_0) matrices run on the CPU only: Device::cuda refuses them.
  static Model load(const std::string& dir, const ModelOptions& opt = {});
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;

  const ModelConfig& config() const;
  const ModelOptions& options() const;
  int64_t vocab() const;            // logits per text token (config.logits_size())
  int64_t max_text_tokens() const;  // the context limit in force
  int64_t weight_bytes() const;     // bytes of the tensors the forward reads
  // Bytes of weights read from memory for one decode step (every tensor once; the embedding only for the
  // looked-up rows; lm_head in full).
  int64_t weight_bytes_per_token() const;
  // The backend in words, e.g. "cpu (2 threads)" or "cuda: NVIDIA H200 (sm_90, 132 SMs, 140 GiB)".
  std::string backend_name() const;
  // How the checkpoint stores its weights: "bf16", or "q8_0 (norms bf16)" for 8-bit matrices
  // (describe_weight_format).
  const std::string& weight_format() const;
  // Peak device memory the model allocated so far (CUDA; 0 on the CPU).
  int64_t device_bytes_peak() const;
  // What held the device memory after the step that used the most (CUDA; zeros on the CPU): the total (as
  // device_bytes_peak, weights included), the KV caches' slabs, the step activations' arena, the buffer a
  // prompt piece reads the cached keys and values from; the rest is the CUDA runtime's and the libraries'.
  struct DeviceMemory {
    int64_t total = 0, kv_cache = 0, activations = 0, prefill_keys = 0;
  };
  DeviceMemory device_memory_at_peak() const;
  // Device memory still free now (CUDA), or -1 on the CPU (for sizing a KV budget).
  int64_t device_bytes_free() const;
  // Forward passes so far that replayed a CUDA graph, and graphs captured (0 on the CPU or without graphs).
  int64_t graph_replays() const;
  int64_t graph_captures() const;
  GraphStats graph_stats() const;  // the same with the other steps and causes
  // Where the time of the replayed steps went (sums; zeros on the CPU or without graphs).
  ReplayTimes replay_times() const;
  // Steps whose decode was planned during the step before (ModelOptions::cuda_plan_ahead), and plans made
  // ahead that were dropped (the next step was another one). 0 on the CPU.
  int64_t plans_ahead_used() const;
  int64_t plans_ahead_dropped() const;

  // Sequences. Ids are never reused.
  SeqId new_sequence();
  void release(SeqId id);
  int64_t text_tokens(SeqId id) const;    // text tokens appended so far
  int64_t stream_tokens(SeqId id) const;  // text + summary tokens run so far

  // Appends text tokens to a sequence and runs them (with the summary tokens due) through every layer.
  // On a sequence with nothing cached, the layers attend through the prefill kernel
  // (ksa::cpu::attention_forward) and then fill the caches; otherwise through the caches and the decode
  // kernel (a new turn of a conversation never recomputes the history). `logits` receives
  // [rows, vocab()] floats (rows = 0, 1 or tokens.size() as `which` says; its size is checked). Throws
  // ksa::Error before changing anything when an id is bad or the context limit would be passed.
  void append(SeqId id, std::span<const int32_t> tokens, LogitsFor which, std::span<float> logits);

  // A batched step: every item's sequence advances by its tokens (prompt chunks and single tokens mixed;
  // each id at most once). Throws ksa::Error naming the item before changing anything when an item is
  // invalid (unknown id, empty tokens, a token id outside the vocabulary or a summary token id, the context
  // limit, a bad sampler config), so the caller can drop that item and step the others.
  void step(std::span<const StepItem> items, StepResult& out);
  // The check step() runs on one item (throws ksa::Error; changes nothing).
  void check(const StepItem& item) const;

  // KV cache bytes held by a sequence over all layers, and what full attention (every text token in every
  // layer, same dtype) would hold for the same text.
  int64_t kv_bytes(SeqId id) const;
  int64_t kv_bytes_full_attention(SeqId id) const;
  // KV cache bytes held by all live sequences.
  int64_t kv_bytes_in_use() const;
  // Upper bound of the KV cache bytes one sequence of `text_tokens` text tokens holds (for admission).
  int64_t kv_bytes_for(int64_t text_tokens) const;
  int64_t num_sequences() const;

 private:
  struct Impl;
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ksa
