// The Qwen3-KSA forward (see ksa/model.hpp), written once over the backend operations of
// model/backend.hpp; the CPU and CUDA backends supply the arithmetic, memory and KV caches.
#include "ksa/model.hpp"

#include <algorithm>
#include <initializer_list>
#include <map>
#include <utility>

#include "ksa/error.hpp"
#include "model/backend.hpp"

namespace ksa {
namespace {

using engine::Act;
using engine::Prec;
using engine::Rows;
using engine::Weight;

struct Layer {
  Weight in_norm, in_norm_summary, q, k, v, o, q_norm, k_norm, q_s, k_s, v_s, post_norm, gate, up, down;
  bool summary_layer = true;  // false: causal over text, summary tokens pass through unchanged
  int64_t W = 0;              // the window the kernels use
};

// One piece of a step: tokens of one sequence, and what to return for them.
struct Piece {
  size_t item = 0;
  std::span<const int32_t> tokens;
  bool all_logits = false;   // every text row's logits
  bool last_logits = false;  // the last text row's logits (also when sampling)
  bool sample = false;
  bool prefill = false;  // attend with the prefill kernel (else the decode kernel through the cache)
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A step splits its MLP into at most n / kMlpPartRows parts (Model::step): parts of ~2,048 rows or more.
constexpr int64_t kMlpPartRows = 2048;

// Activations carved one after another from one step buffer, each start rounded up to kCarveAlign bytes (the
// 16-byte loads of the GPU's kernels need 16).
constexpr int64_t kCarveAlign = 256;
int64_t carve_round(int64_t bytes) { return ceil_div(bytes, kCarveAlign) * kCarveAlign; }
int64_t carved_bytes(std::initializer_list<int64_t> sizes) {
  int64_t total = 0;
  for (int64_t b : sizes) total += carve_round(b);
  return total;
}
struct Carver {
  void* base;
  int64_t used = 0;
  Act take(int64_t rows, int64_t cols, DType t) {
    const Act a{static_cast<char*>(base) + used, rows, cols, t};
    used += carve_round(rows * cols * int64_t(dtype_size(t)));
    return a;
  }
};

}  // namespace

struct Model::Impl {
  ModelConfig cfg;
  ModelOptions opt;
  std::unique_ptr<Checkpoint> ckpt;
  std::unique_ptr<engine::Backend> be;
  Weight embed, final_norm, lm_head;
  std::vector<Layer> layers;
  Spec spec;  // k, S and the position modes (W per layer in `layers`)
  bool summaries = true;
  int64_t max_text = 0;
  struct Seq {
    SeqId cache_id = -1;  // the same in every layer's cache
    int64_t T = 0, sums = 0;
    uint64_t draws = 0;  // tokens sampled by step() so far
  };
  std::map<SeqId, Seq> seqs;
  SeqId next_id = 0;
  int64_t weight_bytes = 0, weight_bytes_token = 0;
  std::string weight_format;
  engine::StepDesc desc;  // reused between steps

  Seq& find(SeqId id, const char* what) { return const_cast<Seq&>(std::as_const(*this).find(id, what)); }
  const Seq& find(SeqId id, const char* what) const {
    auto it = seqs.find(id);
    if (it == seqs.end()) fail("Model::", what, ": unknown sequence id ", id);
    return it->second;
  }

  // Appends to `desc` the stream tokens that appending `tokens` to a sequence holding T0 text tokens runs:
  // each text token, and after a chunk's k-th token its S summary tokens (docs/ksa.md: The stream). Returns the stream
  // rows of the text tokens.
  std::vector<int32_t> add_stream(int64_t T0, std::span<const int32_t> tokens) {
    std::vector<int32_t> text_rows;
    const StreamGeometry geo = StreamGeometry::of(spec);
    const int64_t T1 = T0 + int64_t(tokens.size());
    const Layout lay = geo.layout(T1);
    auto push = [&](int32_t id, int64_t stream_pos, bool summary) {
      if (summary) desc.summary_rows.push_back(int32_t(desc.ids.size()));
      else text_rows.push_back(int32_t(desc.ids.size()));
      desc.ids.push_back(id);
      desc.positions.push_back(int32_t(rope_position(lay, spec.text_positions, spec.summary_positions, stream_pos)));
    };
    for (size_t i = 0; i < tokens.size(); ++i) {
      const int64_t t = T0 + int64_t(i);
      push(tokens[i], geo.text_position(t), false);
      if (summaries && (t + 1) % geo.chunk_size == 0)
        for (int64_t j = 0; j < geo.S; ++j)
          push(int32_t(cfg.summary_token_begin + j), geo.summary_position(t / geo.chunk_size, j), true);
    }
    return text_rows;
  }

  // Runs one round: at most one piece per sequence. Logits rows land in `logits` (in piece order, each
  // piece's rows consecutive); sampled ids in `sampled` (per piece, -1 when none).
  void run(std::span<const Piece> pieces, std::span<const StepItem> items, std::vector<float>& logits,
           std::vector<int32_t>& sampled);

  // What step() and append() (`who`) check of one item before anything runs.
  void check_item(const StepItem& it, const char* who) const {
    const Seq& s = find(it.id, who);
    const int64_t n = int64_t(it.tokens.size());
    if (n == 0) fail("Model::", who, ": sequence ", it.id, ": no tokens");
    if (s.T + n > max_text)
      fail("Model::", who, ": sequence ", it.id, " would hold ", s.T + n, " text tokens, past the context limit of ",
           max_text, " (", s.T, " already, ", n, " new)");
    for (int64_t i = 0; i < n; ++i)
      if (it.tokens[size_t(i)] < 0 || it.tokens[size_t(i)] >= cfg.vocab_size)
        fail("Model::", who, ": sequence ", it.id, ": token ", i, " has id ", it.tokens[size_t(i)],
             ", outside the vocabulary [0, ", cfg.vocab_size, ")");
    check_summary_ids(it.tokens, who);
    if (it.sampler) it.sampler->validate();
  }

  // Summary token ids are the model's own (docs/ksa.md: The stream): a caller may not append them as text.
  void check_summary_ids(std::span<const int32_t> tokens, const char* who) const {
    if (!summaries) return;
    for (size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] >= cfg.summary_token_begin && tokens[i] < cfg.summary_token_begin + spec.S)
        fail("Model::", who, ": token ", i, " has id ", tokens[i], ", a summary token id (summary_token_begin ",
             cfg.summary_token_begin, ", ", spec.S, " per chunk); summary tokens are inserted by the model");
  }
};

void Model::Impl::run(std::span<const Piece> pieces, std::span<const StepItem> items, std::vector<float>& logits,
                      std::vector<int32_t>& sampled) {
  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, Hq = cfg.num_attention_heads,
                Hkv = cfg.num_key_value_heads, D = cfg.head_dim, V = cfg.logits_size();
  const float eps = float(cfg.rms_norm_eps);
  engine::Backend& b = *be;

  // The step's rows: decoding sequences first (their rows packed from 0), then prefill pieces.
  desc.ids.clear();
  desc.positions.clear();
  desc.summary_rows.clear();
  desc.logits_rows.clear();
  desc.seqs.clear();
  std::vector<size_t> order;
  for (int pass = 0; pass < 2; ++pass)
    for (size_t i = 0; i < pieces.size(); ++i)
      if (pieces[i].prefill == (pass == 1)) order.push_back(i);
  struct Out {
    size_t piece;
    int64_t first, count;  // logits rows of this piece among desc.logits_rows
  };
  std::vector<Out> outs;
  for (size_t i : order) {
    const Piece& pc = pieces[i];
    Seq& s = find(items[pc.item].id, "step");
    engine::StepSeq ss;
    ss.cache_id = s.cache_id;
    ss.row0 = desc.rows();
    ss.fresh = pc.prefill;
    ss.cached = s.T + s.sums;
    const std::vector<int32_t> text_rows = add_stream(s.T, pc.tokens);
    ss.n = desc.rows() - ss.row0;
    desc.seqs.push_back(ss);
    Out o{i, int64_t(desc.logits_rows.size()), 0};
    if (pc.all_logits) desc.logits_rows.insert(desc.logits_rows.end(), text_rows.begin(), text_rows.end());
    else if (pc.last_logits || pc.sample) desc.logits_rows.push_back(text_rows.back());
    o.count = int64_t(desc.logits_rows.size()) - o.first;
    outs.push_back(o);
  }
  // The logits rows must be increasing for gather: sort them with their owners.
  std::vector<int64_t> perm(desc.logits_rows.size());
  for (size_t i = 0; i < perm.size(); ++i) perm[i] = int64_t(i);
  std::sort(perm.begin(), perm.end(),
            [&](int64_t a, int64_t c) { return desc.logits_rows[size_t(a)] < desc.logits_rows[size_t(c)]; });
  std::vector<int32_t> sorted_rows(perm.size());
  std::vector<int64_t> slot_of(perm.size());  // unsorted index -> sorted position
  for (size_t i = 0; i < perm.size(); ++i) {
    sorted_rows[i] = desc.logits_rows[size_t(perm[i])];
    slot_of[size_t(perm[i])] = int64_t(i);
  }
  desc.logits_rows = sorted_rows;

  const int64_t n = desc.rows();
  b.begin_step(desc);
  const bool have_summaries = !desc.summary_rows.empty();
  const int64_t ns = int64_t(desc.summary_rows.size());
  const int64_t NQ = Hq * D, NKV = Hkv * D;
  const DType narrow = b.dtype(Prec::narrow), cache_t = b.dtype(Prec::cache);
  // A long step runs the MLP (norm, SwiGLU, down product) on parts of its rows, at most n / kMlpPartRows of
  // them (rounded to 64 rows, the last part takes the rest: 4,100 rows run as 2,112 and 1,988), so that
  // SwiGLU's output fits the buffer q/k/v use (below): with the 4B shape (I = 9,728 against 6,144 q/k/v
  // columns) a 4,608-row prefill step needs 33 MB less on the GPU, and products of ~2,000 rows still fill it.
  const int64_t mlp_parts =
      I > NQ + 2 * NKV ? std::min(ceil_div(I, NQ + 2 * NKV), std::max<int64_t>(1, n / kMlpPartRows)) : 1;
  // Parts of a multiple of 64 rows: every part's x starts 256-byte aligned, as cuBLASLt's choices assume.
  const int64_t mlp_rows = mlp_parts == 1 ? n : ceil_div(ceil_div(n, mlp_parts), 64) * 64;
  Act x = b.act(n, H, Prec::wide);
  // qkv (from its product to qk_norm_rope), att (from the attention to the o product) and gu (from SwiGLU to
  // the down product) are never live at once: one buffer holds each in turn (a 2,304-row prefill step of the
  // 4B shape on the GPU needs 64 MB less). Nor are qc, kc, vc (from qk_norm_rope to the attention) and h, gu2
  // (a norm's output, from the norm to the product after it; linear_swiglu's scratch): a second buffer holds
  // either group (44 MB less for 4,608 rows).
  const int64_t nb = int64_t(dtype_size(narrow));
  const Act shared = b.act(1, ceil_div(std::max(n * (NQ + 2 * NKV), mlp_rows * I) * nb, 4), Prec::wide);
  const Act qkv{shared.data, n, NQ + 2 * NKV, narrow}, att{shared.data, n, NQ, narrow};
  const Act gu{shared.data, mlp_rows, I, narrow};
  const int64_t swiglu_rows = std::min(n, engine::Backend::kSwigluRows);
  const int64_t cb = int64_t(dtype_size(cache_t));
  const int64_t qkvc_bytes = carved_bytes({n * NQ * cb, n * NKV * cb, n * NKV * cb});
  const int64_t hgu_bytes = carved_bytes({n * H * nb, swiglu_rows * 2 * I * nb});
  const Act second = b.act(1, ceil_div(std::max(qkvc_bytes, hgu_bytes), 4), Prec::wide);
  Carver c1{second.data}, c2{second.data};
  const Act qc = c1.take(n, NQ, cache_t), kc = c1.take(n, NKV, cache_t), vc = c1.take(n, NKV, cache_t);
  const Act h = c2.take(n, H, narrow), gu2 = c2.take(swiglu_rows, 2 * I, narrow);  // gu2: linear_swiglu's scratch
  Act saved, hs, ys;
  if (have_summaries) {
    saved = b.act(ns, H, Prec::wide);
    hs = b.act(ns, H, Prec::narrow);
    ys = b.act(ns, NQ, Prec::narrow);
  }
  b.embed(embed, x);
  const double mix = cfg.mix_coeff;
  // Each residual add runs with the product before it (linear_add: on the GPU in the product's epilogue) and
  // each norm with the product after it (rms_norm_linear_cat, rms_norm_swiglu: on the GPU no norm kernels at
  // a few rows), except the input norm of a step with summary rows (their gather, norm weights and
  // projections sit between).
  for (size_t li = 0; li < layers.size(); ++li) {
    const Layer& L = layers[li];
    const Weight* qkv_w[3] = {&L.q, &L.k, &L.v};
    if (!have_summaries) {
      b.rms_norm_linear_cat(x, L.in_norm, eps, qkv_w, qkv, h);
    } else {
      if (!L.summary_layer) b.gather(x, Rows::summary, saved);
      b.rms_norm(x, L.in_norm, L.in_norm_summary, eps, h);
      b.linear_cat(h, qkv_w, qkv);
    }
    // Summary tokens blend their own projections: mix * summary + (1 - mix) * shared.
    if (L.q_s && have_summaries) {
      b.gather(h, Rows::summary, hs);
      const std::pair<const Weight*, int64_t> parts[3] = {{&L.q_s, 0}, {&L.k_s, NQ}, {&L.v_s, NQ + NKV}};
      for (auto [W, col0] : parts) {
        Act yy = ys;
        yy.cols = W->rows;
        b.linear(hs, *W, yy);
        b.blend(qkv, col0, yy, mix);
      }
    }
    b.qk_norm_rope(qkv, L.q_norm, L.k_norm, eps, cfg.rope_theta, Hq, Hkv, D, qc, kc, vc);
    b.attention(li, L.W, qc, kc, vc, Hq, att);
    b.linear_add(att, L.o, x);
    for (int64_t r0 = 0; r0 < n; r0 += mlp_rows) {
      const int64_t m = std::min(mlp_rows, n - r0);
      const Act xm = row_range(x, r0, m), gm = row_range(gu, 0, m);
      b.rms_norm_swiglu(xm, L.post_norm, eps, L.gate, L.up, gm, row_range(h, 0, m), gu2);
      b.linear_add(gm, L.down, xm);
    }
    if (have_summaries && !L.summary_layer) b.scatter(saved, Rows::summary, x);
  }
  for (const Piece& pc : pieces) {
    Seq& s = find(items[pc.item].id, "step");
    const int64_t T1 = s.T + int64_t(pc.tokens.size());
    if (summaries) s.sums = StreamGeometry::of(spec).counts_after_text(T1).sums;
    s.T = T1;
  }

  const int64_t m = int64_t(desc.logits_rows.size());
  sampled.assign(pieces.size(), -1);
  if (m == 0) {
    b.finish_step();
    return;
  }
  Act xl = b.act(m, H, Prec::wide), hl = b.act(m, H, Prec::narrow), lg = b.act(m, V, Prec::wide);
  b.gather(x, Rows::logits, xl);
  b.rms_norm(xl, final_norm, Weight{}, eps, hl);
  b.linear(hl, lm_head, lg);  // the first V rows of lm_head (logits truncated to logits_size)

  std::vector<engine::SampleReq> reqs;
  std::vector<size_t> req_piece;
  bool want_logits = false;
  for (const Out& o : outs) {
    const Piece& pc = pieces[o.piece];
    want_logits |= pc.all_logits || (pc.last_logits && !pc.sample) || items[pc.item].logits != LogitsFor::none;
    if (!pc.sample) continue;
    const StepItem& it = items[pc.item];
    Seq& s = find(it.id, "step");
    reqs.push_back(engine::SampleReq{slot_of[size_t(o.first + o.count - 1)], it.sampler,
                                     sample_uniform(it.sampler->seed, s.draws++), it.history});
    req_piece.push_back(o.piece);
  }
  std::vector<int32_t> ids(reqs.size());
  if (!reqs.empty()) b.sample(lg, reqs, ids);
  std::vector<float> all;
  if (want_logits) {
    all.resize(size_t(m * V));
    b.download(lg, all);
  }
  b.finish_step();
  for (size_t i = 0; i < reqs.size(); ++i) sampled[req_piece[i]] = ids[i];
  // Logits in piece order (each piece's rows in text order).
  logits.clear();
  if (want_logits)
    for (size_t i = 0; i < pieces.size(); ++i)
      for (const Out& o : outs)
        if (o.piece == i)
          for (int64_t r = 0; r < o.count; ++r) {
            const float* src = all.data() + slot_of[size_t(o.first + r)] * V;
            logits.insert(logits.end(), src, src + V);
          }
}

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

Model Model::load(const std::string& dir, const ModelOptions& opt) {
  auto m = std::make_unique<Impl>();
  m->cfg = ModelConfig::load(dir);
  m->opt = opt;
  const ModelConfig& cfg = m->cfg;
  if (opt.kv_dtype != DType::bf16 && opt.kv_dtype != DType::f32)
    fail("Model: kv_dtype must be bf16 or f32 (got ", dtype_name(opt.kv_dtype), ")");
  if (opt.device == Device::cuda && opt.kv_dtype != DType::bf16)
    fail("Model: the CUDA engine keeps the KV cache in bf16 (kv_dtype ", dtype_name(opt.kv_dtype), " asked)");
  if (opt.max_text_tokens < 0) fail("Model: max_text_tokens must be >= 0 (got ", opt.max_text_tokens, ")");
  if (cfg.rope_type != "default")
    fail(dir, "/config.json: rope_type \"", cfg.rope_type, "\" is not supported (default only)");
  // The CUDA engine uploads the weights: a copy in host memory first would only cost time.
  m->ckpt = std::make_unique<Checkpoint>(Checkpoint::open(dir, opt.device == Device::cpu ? opt.load : FileLoad::map));
  const ModelWeights w = bind_weights(cfg, *m->ckpt);
  m->weight_format = describe_weight_format(*m->ckpt);
  if (opt.device == Device::cuda)  // refused before any device memory is taken
    for (const TensorInfo& t : m->ckpt->tensors())
      if (t.dtype == DType::q8_0)
        fail(dir, ": ", t.name,
             " is q8_0: q8_0 weights run on the CPU only (use --device cpu, or the bf16 checkpoint on the GPU)");
  m->max_text = opt.max_text_tokens > 0 ? opt.max_text_tokens : cfg.max_position_embeddings;

  engine::BackendOptions bo;
  bo.threads = opt.threads;
  bo.q_heads = cfg.num_attention_heads;
  bo.cuda_graphs = opt.cuda_graphs;
  bo.cuda_gemv = opt.cuda_gemv;
  bo.gemm_autotune = opt.cuda_gemm_autotune;
  bo.gemv_shape = opt.cuda_gemv_shape;
  bo.plan_ahead = opt.cuda_plan_ahead;
  bo.batch_invariant = opt.batch_invariant;
  if (opt.batch_invariant && opt.device == Device::cuda)
    fail("ModelOptions::batch_invariant: CPU only (the CUDA engine's products depend on the step's rows)");
  if (opt.prefill_tokens < 0) fail("Model: prefill_tokens must be >= 0 (got ", opt.prefill_tokens, ")");
  if (opt.prefill_tokens > 0) bo.prefill_tokens = opt.prefill_tokens;
  m->be = opt.device == Device::cuda ? engine::make_cuda_backend(bo) : engine::make_cpu_backend(bo);
  engine::Backend& be = *m->be;

  // Place the weights (the CPU pages the mmap'ed bytes in; CUDA uploads them), reporting progress.
  int64_t total = 0, done = 0, last = 0;
  for (const TensorInfo& t : m->ckpt->tensors()) total += t.nbytes;
  auto place = [&](const TensorInfo* t) {
    Weight r = be.place(t);
    if (t) done += t->nbytes;
    if (t && opt.progress && (done - last >= (int64_t(64) << 20) || done == total)) {
      opt.progress(done, total);
      last = done;
    }
    return r;
  };

  // The stream: KSA models insert summaries; plain Qwen3 is one chunk as long as the context (no summaries).
  m->summaries = cfg.use_summary_attention;
  m->spec = cfg.use_summary_attention ? cfg.layer_spec(0) : Spec{};
  if (!m->summaries) {
    m->spec.chunk_size = m->max_text + 1;
    m->spec.S = 1;
    m->spec.text_positions = TextPositions::origin;
  }
  m->spec.summarize_tail = false;
  const int64_t causal_W = m->max_text / m->spec.chunk_size + 1;  // W·k >= context: text only, causal

  m->embed = place(w.embed_tokens);
  m->final_norm = place(w.norm);
  m->lm_head = w.lm_head == w.embed_tokens ? m->embed : place(w.lm_head);
  const int64_t H = cfg.hidden_size;
  std::vector<KvCacheConfig> caches;
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
    const LayerWeights& lw = w.layers[size_t(i)];
    Layer L;
    L.in_norm = place(lw.input_layernorm);
    L.in_norm_summary = place(lw.input_layernorm_summary);
    L.q = place(lw.q_proj), L.k = place(lw.k_proj), L.v = place(lw.v_proj), L.o = place(lw.o_proj);
    L.q_norm = place(lw.q_norm), L.k_norm = place(lw.k_norm);
    if (lw.q_proj_summary && lw.k_proj_summary && lw.v_proj_summary && cfg.mix_coeff != 0.0)
      L.q_s = place(lw.q_proj_summary), L.k_s = place(lw.k_proj_summary), L.v_s = place(lw.v_proj_summary);
    L.post_norm = place(lw.post_attention_layernorm);
    L.gate = place(lw.gate_proj), L.up = place(lw.up_proj), L.down = place(lw.down_proj);
    L.summary_layer = cfg.is_summary_layer(i);
    L.W = (m->summaries && L.summary_layer) ? std::min(cfg.layer_spec(i).W, causal_W) : causal_W;
    if (!L.in_norm || !L.q || !L.k || !L.v || !L.o || !L.q_norm || !L.k_norm || !L.post_norm || !L.gate || !L.up ||
        !L.down)
      fail(dir, ": layer ", i, " lacks a required tensor");
    {  // always multiplied together: a backend may run each group as one product
      Weight* qkv[3] = {&L.q, &L.k, &L.v};
      Weight* gu[2] = {&L.gate, &L.up};
      be.fuse(qkv);
      be.fuse(gu);
    }
    for (const Weight* t :
         {&L.in_norm, &L.q, &L.k, &L.v, &L.o, &L.q_norm, &L.k_norm, &L.post_norm, &L.gate, &L.up, &L.down})
      m->weight_bytes += t->nbytes, m->weight_bytes_token += t->nbytes;
    for (const Weight* t : {&L.in_norm_summary, &L.q_s, &L.k_s, &L.v_s}) m->weight_bytes += t->nbytes;

    KvCacheConfig cc;
    cc.spec = m->spec;
    cc.spec.W = L.W;
    cc.Hkv = cfg.num_key_value_heads;
    cc.D = cfg.head_dim;
    cc.dtype = opt.kv_dtype;
    cc.max_text_tokens = m->max_text;
    cc.block_rows = 16;
    caches.push_back(cc);
    m->layers.push_back(std::move(L));
  }
  be.create_caches(caches);
  if (opt.progress && last != total) opt.progress(total, total);
  const int64_t head_bytes = dtype_bytes(m->lm_head.dtype, cfg.logits_size() * H);
  m->weight_bytes += m->final_norm.nbytes + m->embed.nbytes + (w.lm_head == w.embed_tokens ? 0 : m->lm_head.nbytes);
  m->weight_bytes_token += m->final_norm.nbytes + head_bytes + dtype_bytes(m->embed.dtype, H);
  return Model(std::move(m));
}

std::string Model::backend_name() const { return impl_->be->name(); }
const std::string& Model::weight_format() const { return impl_->weight_format; }

std::string describe_weight_format(const Checkpoint& ckpt) {
  // The storage types of the matrices and of the vectors (norms), each in first-seen order.
  std::vector<DType> mats, vecs;
  for (const TensorInfo& t : ckpt.tensors()) {
    std::vector<DType>& v = t.shape.size() == 2 ? mats : vecs;
    if (std::find(v.begin(), v.end(), t.dtype) == v.end()) v.push_back(t.dtype);
  }
  auto names = [](const std::vector<DType>& v) {
    std::string s;
    for (DType t : v) {
      if (!s.empty()) s += '/';
      s += dtype_name(t);
    }
    return s;
  };
  if (vecs.empty() || vecs == mats) return names(mats.empty() ? vecs : mats);
  return names(mats) + " (norms " + names(vecs) + ")";
}
int64_t Model::device_bytes_peak() const { return impl_->be->device_bytes_peak(); }
Model::DeviceMemory Model::device_memory_at_peak() const { return impl_->be->device_memory_at_peak(); }
int64_t Model::device_bytes_free() const { return impl_->be->device_bytes_free(); }
int64_t Model::graph_replays() const { return impl_->be->graph_stats().replays; }
int64_t Model::graph_captures() const { return impl_->be->graph_stats().captures; }
GraphStats Model::graph_stats() const { return impl_->be->graph_stats(); }
ReplayTimes Model::replay_times() const { return impl_->be->replay_times(); }
int64_t Model::plans_ahead_used() const { return impl_->be->plans_ahead_used(); }
int64_t Model::plans_ahead_dropped() const { return impl_->be->plans_ahead_dropped(); }

const char* to_string(Device d) { return d == Device::cuda ? "cuda" : "cpu"; }

Device default_device(const std::string& dir) {
  if (!cuda_engine_available()) return Device::cpu;
  const Checkpoint ckpt = Checkpoint::open(dir);
  for (const TensorInfo& t : ckpt.tensors())
    if (t.dtype == DType::q8_0) return Device::cpu;
  return default_device(ModelConfig::load(dir));
}

Device default_device(const ModelConfig& cfg) {
  return cuda_engine_available() && (cfg.head_dim == 64 || cfg.head_dim == 128) ? Device::cuda : Device::cpu;
}

const ModelConfig& Model::config() const { return impl_->cfg; }
const ModelOptions& Model::options() const { return impl_->opt; }
int64_t Model::vocab() const { return impl_->cfg.logits_size(); }
int64_t Model::max_text_tokens() const { return impl_->max_text; }
int64_t Model::weight_bytes() const { return impl_->weight_bytes; }
int64_t Model::weight_bytes_per_token() const { return impl_->weight_bytes_token; }

SeqId Model::new_sequence() {
  Impl& m = *impl_;
  Impl::Seq s;
  m.be->settle();
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const SeqId c = m.be->cache(i).add_sequence();
    if (i == 0) s.cache_id = c;
    else if (c != s.cache_id) fail("Model: internal error: the layers' caches gave different sequence ids");
  }
  const SeqId id = m.next_id++;
  m.seqs.emplace(id, s);
  return id;
}

void Model::release(SeqId id) {
  Impl& m = *impl_;
  Impl::Seq& s = m.find(id, "release");
  m.be->settle();
  for (size_t i = 0; i < m.layers.size(); ++i) m.be->cache(i).release(s.cache_id);
  m.seqs.erase(id);
}

int64_t Model::text_tokens(SeqId id) const { return impl_->find(id, "text_tokens").T; }
int64_t Model::stream_tokens(SeqId id) const {
  const Impl::Seq& s = impl_->find(id, "stream_tokens");
  return s.T + s.sums;
}

void Model::check(const StepItem& it) const { impl_->check_item(it, "step"); }

void Model::step(std::span<const StepItem> items, StepResult& out) {
  Impl& m = *impl_;
  for (size_t i = 0; i < items.size(); ++i) {
    check(items[i]);
    for (size_t j = 0; j < i; ++j)
      if (items[j].id == items[i].id) fail("Model::step: sequence ", items[i].id, " appears twice in one step");
  }
  const int64_t V = m.cfg.logits_size();
  // Pieces: a prompt (the first tokens of a fresh sequence, or more tokens than the backend's decode takes in
  // one step) runs through the prefill kernel in pieces of at most max_prefill_tokens; a few tokens of a
  // continuing sequence through the decode kernel. Round r runs every item's r-th piece.
  std::vector<std::vector<Piece>> rounds;
  for (size_t i = 0; i < items.size(); ++i) {
    const StepItem& it = items[i];
    const Impl::Seq& s = m.find(it.id, "step");
    const bool fresh = s.T == 0 && s.sums == 0;
    const size_t n = it.tokens.size();
    size_t r = 0;
    for (size_t a = 0; a < n; ++r) {
      const size_t rest = n - a;
      const bool prefill = (fresh && a == 0) || rest > size_t(m.be->max_continuation_tokens(s.T + int64_t(a)));
      const size_t len = prefill ? std::min<size_t>(rest, size_t(m.be->max_prefill_tokens())) : rest;
      Piece pc;
      pc.prefill = prefill;
      pc.item = i;
      pc.tokens = it.tokens.subspan(a, len);
      a += len;
      const bool final = a == n;
      pc.all_logits = it.logits == LogitsFor::all;
      pc.last_logits = final && it.logits == LogitsFor::last;
      pc.sample = final && it.sampler;
      if (rounds.size() <= r) rounds.resize(r + 1);
      rounds[r].push_back(pc);
    }
  }
  out.next.assign(items.size(), -1);
  out.logits.clear();
  out.logits_row.assign(items.size(), 0);
  // Rows per item in out.logits, item after item.
  std::vector<int64_t> rows(items.size());
  int64_t total = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const LogitsFor w = items[i].logits;
    rows[i] = w == LogitsFor::none ? 0 : w == LogitsFor::last ? 1 : int64_t(items[i].tokens.size());
    out.logits_row[i] = total;
    total += rows[i];
  }
  out.logits.resize(size_t(total * V));
  std::vector<int64_t> filled(items.size(), 0);
  std::vector<float> lg;
  std::vector<int32_t> sampled;
  for (const std::vector<Piece>& round : rounds) {
    m.run(round, items, lg, sampled);
    size_t at = 0;
    for (size_t p = 0; p < round.size(); ++p) {
      const Piece& pc = round[p];
      const int64_t have = pc.all_logits ? int64_t(pc.tokens.size()) : (pc.last_logits || pc.sample) ? 1 : 0;
      const bool keep = pc.all_logits || pc.last_logits;
      if (keep) {
        std::copy_n(lg.begin() + int64_t(at) * V, have * V,
                    out.logits.begin() + (out.logits_row[pc.item] + filled[pc.item]) * V);
        filled[pc.item] += have;
      }
      if (have && !lg.empty()) at += size_t(have);
      if (pc.sample) out.next[pc.item] = sampled[p];
    }
  }
}

void Model::append(SeqId id, std::span<const int32_t> tokens, LogitsFor which, std::span<float> logits) {
  Impl& m = *impl_;
  const StepItem it{id, tokens, which, nullptr, {}};
  const int64_t n = int64_t(tokens.size()), V = m.cfg.logits_size();
  if (n > 0) m.check_item(it, "append");
  else m.find(id, "append");
  const int64_t rows = which == LogitsFor::none ? 0 : which == LogitsFor::last ? (n > 0 ? 1 : 0) : n;
  if (int64_t(logits.size()) != rows * V)
    fail("Model::append: logits holds ", logits.size(), " floats; ", rows, " row(s) of ", V, " = ", rows * V,
         " needed");
  if (n == 0) return;
  StepResult r;
  step(std::span<const StepItem>(&it, 1), r);
  std::copy(r.logits.begin(), r.logits.end(), logits.begin());
}

int64_t Model::kv_bytes(SeqId id) const {
  const Impl& m = *impl_;
  const Impl::Seq& s = m.find(id, "kv_bytes");
  int64_t b = 0;
  for (size_t i = 0; i < m.layers.size(); ++i) b += m.be->cache(i).bytes_in_use(s.cache_id);
  return b;
}

int64_t Model::kv_bytes_in_use() const {
  int64_t b = 0;
  for (size_t i = 0; i < impl_->layers.size(); ++i) b += impl_->be->cache(i).bytes_in_use();
  return b;
}

int64_t Model::kv_bytes_for(int64_t text_tokens) const {
  const Impl& m = *impl_;
  int64_t b = 0;
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const KvCache& c = m.be->cache(i);
    const KvCacheConfig& cc = c.config();
    const int64_t T = std::min(text_tokens, m.max_text), P = cc.block_rows;
    const int64_t text = std::min(c.text_ring_rows(), (T + P - 1) / P * P) + P;
    const int64_t sums = cc.stores_summaries() ? cc.geometry().counts_after_text(T).sums : cc.spec.S;
    b += ((text + P - 1) / P + (sums + P - 1) / P) * c.block_bytes();
  }
  return b;
}

int64_t Model::num_sequences() const { return int64_t(impl_->seqs.size()); }

int64_t Model::kv_bytes_full_attention(SeqId id) const {
  const Impl& m = *impl_;
  const Impl::Seq& s = m.find(id, "kv_bytes_full_attention");
  return s.T * m.cfg.num_hidden_layers * 2 * m.cfg.num_key_value_heads * m.cfg.head_dim * dtype_size(m.opt.kv_dtype);
}

}  // namespace ksa
