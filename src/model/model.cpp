// The Qwen3-KSA forward on the CPU (see ksa/model.hpp).
#include "ksa/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <thread>
#include <utility>

#include "ksa/cpu.hpp"
#include "ksa/decode.hpp"
#include "ksa/dense.hpp"
#include "ksa/error.hpp"

namespace ksa {
namespace {

// A weight tensor as the dense ops read it: a pointer aligned to its element size (a copy only when the
// file's offset is not) and its dtype.
struct Tensor {
  std::shared_ptr<AlignedData> mem;
  const void* data = nullptr;
  DType dtype = DType::bf16;
  int64_t nbytes = 0;
  explicit operator bool() const { return data != nullptr; }
};

Tensor bind(const TensorInfo* t) {
  Tensor r;
  if (!t) return r;
  r.mem = std::make_shared<AlignedData>(*t, size_t(dtype_size(t->dtype)));
  r.data = r.mem->data();
  r.dtype = t->dtype;
  r.nbytes = t->nbytes;
  return r;
}

struct Layer {
  Tensor in_norm, in_norm_summary, q, k, v, o, q_norm, k_norm, q_s, k_s, v_s, post_norm, gate, up, down;
  bool summary_layer = true;  // false: causal over text, summary tokens pass through unchanged
  int64_t W = 0;              // the window the kernels use
};

// One new stream token of an append.
struct NewToken {
  int32_t id = 0;       // embedding row
  bool summary = false;
  int64_t position = 0; // RoPE position
};

}  // namespace

struct Model::Impl {
  ModelConfig cfg;
  ModelOptions opt;
  std::unique_ptr<Checkpoint> ckpt;
  Tensor embed, final_norm, lm_head;
  std::vector<Layer> layers;
  Spec spec;          // k, S and the position modes (W per layer in `layers`)
  bool summaries = true;
  int64_t max_text = 0;
  int threads = 1;
  std::vector<KvCache> caches;  // one per layer
  struct Seq {
    std::vector<SeqId> ids;  // the sequence's id in each layer's cache
    int64_t T = 0, sums = 0;
    uint64_t draws = 0;  // tokens sampled by step() so far
  };
  std::map<SeqId, Seq> seqs;
  SeqId next_id = 0;
  int64_t weight_bytes = 0, weight_bytes_token = 0;

  Seq& find(SeqId id, const char* what) { return const_cast<Seq&>(std::as_const(*this).find(id, what)); }
  const Seq& find(SeqId id, const char* what) const {
    auto it = seqs.find(id);
    if (it == seqs.end()) fail("Model::", what, ": unknown sequence id ", id);
    return it->second;
  }

  // The stream tokens that appending `tokens` to a sequence at (T, sums) runs, with positions.
  std::vector<NewToken> stream_of(int64_t T0, std::span<const int32_t> tokens) const {
    std::vector<NewToken> out;
    const int64_t k = spec.k, S = spec.S, T1 = T0 + int64_t(tokens.size());
    const Layout lay(k, S, T1, false);
    for (size_t i = 0; i < tokens.size(); ++i) {
      const int64_t t = T0 + int64_t(i);
      out.push_back(NewToken{tokens[i], false, rope_position(lay, spec.text_positions, spec.summary_positions,
                                                             lay.text_to_stream(t))});
      if (summaries && (t + 1) % k == 0) {
        const int64_t c = t / k;
        for (int64_t j = 0; j < S; ++j)
          out.push_back(NewToken{int32_t(cfg.summary_token_begin + j), true,
                                 rope_position(lay, spec.text_positions, spec.summary_positions, lay.summary_to_stream(c, j))});
      }
    }
    return out;
  }

  void run(Seq& seq, std::span<const int32_t> tokens, LogitsFor which, std::span<float> logits);

  // Summary token ids are the model's own (KSA.md §2): a caller may not append them as text.
  void check_summary_ids(std::span<const int32_t> tokens, const char* who) const {
    if (!summaries) return;
    for (size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] >= cfg.summary_token_begin && tokens[i] < cfg.summary_token_begin + spec.S)
        fail(who, ": token ", i, " has id ", tokens[i], ", a summary token id (summary_token_begin ",
             cfg.summary_token_begin, ", ", spec.S, " per chunk); summary tokens are inserted by the model");
  }
};

namespace {

// y[rows] = W·x for the rows listed (gathered into a contiguous block and scattered back).
void linear_rows(const float* x, const std::vector<int64_t>& rows, int64_t K, const Tensor& W, int64_t N, float* y,
                 int threads, std::vector<float>& xs, std::vector<float>& ys) {
  const int64_t m = int64_t(rows.size());
  xs.resize(size_t(m * K));
  ys.resize(size_t(m * N));
  for (int64_t i = 0; i < m; ++i) std::copy_n(x + rows[size_t(i)] * K, K, xs.data() + i * K);
  cpu::linear(xs.data(), m, K, W.data, W.dtype, N, ys.data(), threads);
  for (int64_t i = 0; i < m; ++i) std::copy_n(ys.data() + i * N, N, y + rows[size_t(i)] * N);
}

void store_rounded(DType t, const float* src, int64_t n, void* dst) {
  for (int64_t i = 0; i < n; ++i) store_from_float(t, dst, i, src[i]);
}

}  // namespace

void Model::Impl::run(Seq& seq, std::span<const int32_t> tokens, LogitsFor which, std::span<float> logits) {
  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, Hq = cfg.num_attention_heads,
                Hkv = cfg.num_key_value_heads, D = cfg.head_dim, V = cfg.logits_size();
  const float eps = float(cfg.rms_norm_eps);
  const std::vector<NewToken> st = stream_of(seq.T, tokens);
  const int64_t n = int64_t(st.size());
  const bool prefill = seq.T == 0 && seq.sums == 0;
  const DType kvt = opt.kv_dtype;
  const int64_t kvsz = dtype_size(kvt);

  std::vector<int64_t> text_rows, sum_rows;
  for (int64_t r = 0; r < n; ++r) (st[size_t(r)].summary ? sum_rows : text_rows).push_back(r);

  // Embedding.
  std::vector<float> x(size_t(n * H));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < H; ++i)
      x[size_t(r * H + i)] = load_as_float(embed.dtype, embed.data, int64_t(st[size_t(r)].id) * H + i);

  std::vector<float> h(size_t(n * H)), q(size_t(n * Hq * D)), kk(size_t(n * Hkv * D)), vv(size_t(n * Hkv * D)),
      att(size_t(n * Hq * D)), g(size_t(n * I)), u(size_t(n * I)), tmp, xs, ys, saved;
  std::vector<std::byte> qb(size_t(n * Hq * D * kvsz)), kb(size_t(n * Hkv * D * kvsz)), vb(size_t(n * Hkv * D * kvsz)),
      ob(size_t(n * Hq * D * kvsz));
  const double mix = cfg.mix_coeff;

  for (size_t li = 0; li < layers.size(); ++li) {
    const Layer& L = layers[li];
    if (!L.summary_layer && !sum_rows.empty()) {
      saved.resize(sum_rows.size() * size_t(H));
      for (size_t i = 0; i < sum_rows.size(); ++i) std::copy_n(x.data() + sum_rows[i] * H, H, saved.data() + i * H);
    }
    // Input norm (the summary layernorm for summary tokens when configured).
    h = x;
    if (L.in_norm_summary && !sum_rows.empty()) {
      for (int64_t r = 0; r < n; ++r)
        cpu::rms_norm(h.data() + r * H, 1, H, st[size_t(r)].summary ? L.in_norm_summary.data : L.in_norm.data,
                      st[size_t(r)].summary ? L.in_norm_summary.dtype : L.in_norm.dtype, eps);
    } else {
      cpu::rms_norm(h.data(), n, H, L.in_norm.data, L.in_norm.dtype, eps);
    }
    // q, k, v; summary tokens blend their own projections (mix·summary + (1-mix)·shared).
    const bool blend = L.q_s && !sum_rows.empty();
    struct Proj {
      const Tensor &w, &ws;
      float* y;
      int64_t N;
    } projs[3] = {{L.q, L.q_s, q.data(), Hq * D}, {L.k, L.k_s, kk.data(), Hkv * D}, {L.v, L.v_s, vv.data(), Hkv * D}};
    for (const Proj& p : projs) {
      if (!blend) {
        cpu::linear(h.data(), n, H, p.w.data, p.w.dtype, p.N, p.y, threads);
        continue;
      }
      if (mix != 1.0) {
        cpu::linear(h.data(), n, H, p.w.data, p.w.dtype, p.N, p.y, threads);
      }
      tmp.resize(size_t(n * p.N));  // only the summary rows are written and read
      linear_rows(h.data(), sum_rows, H, p.ws, p.N, tmp.data(), threads, xs, ys);
      if (mix == 1.0) linear_rows(h.data(), text_rows, H, p.w, p.N, p.y, threads, xs, ys);
      for (int64_t r : sum_rows)
        for (int64_t i = 0; i < p.N; ++i) {
          float& y = p.y[r * p.N + i];
          y = mix == 1.0 ? tmp[size_t(r * p.N + i)] : float(mix * tmp[size_t(r * p.N + i)] + (1.0 - mix) * y);
        }
    }
    // Per-head norms, RoPE at the stream positions, rounding to the cache dtype.
    cpu::rms_norm(q.data(), n * Hq, D, L.q_norm.data, L.q_norm.dtype, eps);
    cpu::rms_norm(kk.data(), n * Hkv, D, L.k_norm.data, L.k_norm.dtype, eps);
    for (int64_t r = 0; r < n; ++r) {
      cpu::rope(q.data() + r * Hq * D, Hq, D, st[size_t(r)].position, cfg.rope_theta);
      cpu::rope(kk.data() + r * Hkv * D, Hkv, D, st[size_t(r)].position, cfg.rope_theta);
    }
    store_rounded(kvt, q.data(), n * Hq * D, qb.data());
    store_rounded(kvt, kk.data(), n * Hkv * D, kb.data());
    store_rounded(kvt, vv.data(), n * Hkv * D, vb.data());

    // Attention: the prefill kernel on a fresh sequence (then the cache keeps what stays visible), the
    // decode kernel through the cache otherwise.
    KvCache& cache = caches[li];
    if (prefill) {
      AttentionParams p = dense_params(Layout(spec.k, spec.S, seq.T + int64_t(tokens.size()), false), L.W, 1, Hq, Hkv, D,
                                       kvt, {qb.data(), kb.data(), vb.data(), ob.data()});
      p.num_threads = threads;
      cpu::attention_forward(p);
      cache.prefill(seq.ids[li], KvRows::dense(kb.data(), n, Hkv, D, kvt), KvRows::dense(vb.data(), n, Hkv, D, kvt));
    } else {
      DecodeIO io;
      io.Hq = Hq;
      io.dtype = kvt;
      io.q = TensorView::dense(qb.data(), n, Hq, D);
      io.k = TensorView::dense(kb.data(), n, Hkv, D);
      io.v = TensorView::dense(vb.data(), n, Hkv, D);
      io.out = TensorView::dense(ob.data(), n, Hq, D);
      io.num_threads = threads;
      const SeqId id = seq.ids[li];
      const int64_t cnt = n;
      cpu::attention_decode(cache, std::span<const SeqId>(&id, 1), std::span<const int64_t>(&cnt, 1), io);
    }
    for (int64_t i = 0; i < n * Hq * D; ++i) att[size_t(i)] = load_as_float(kvt, ob.data(), i);

    // o_proj + residual, post norm, SwiGLU MLP + residual.
    cpu::linear(att.data(), n, Hq * D, L.o.data, L.o.dtype, H, h.data(), threads);
    for (int64_t i = 0; i < n * H; ++i) x[size_t(i)] += h[size_t(i)];
    h = x;
    cpu::rms_norm(h.data(), n, H, L.post_norm.data, L.post_norm.dtype, eps);
    cpu::linear(h.data(), n, H, L.gate.data, L.gate.dtype, I, g.data(), threads);
    cpu::linear(h.data(), n, H, L.up.data, L.up.dtype, I, u.data(), threads);
    cpu::silu_mul(g.data(), u.data(), n * I);
    cpu::linear(g.data(), n, I, L.down.data, L.down.dtype, H, h.data(), threads);
    for (int64_t i = 0; i < n * H; ++i) x[size_t(i)] += h[size_t(i)];

    if (!L.summary_layer)
      for (size_t i = 0; i < sum_rows.size(); ++i) std::copy_n(saved.data() + i * H, H, x.data() + sum_rows[i] * H);
  }
  seq.T += int64_t(tokens.size());
  seq.sums += int64_t(sum_rows.size());

  // Final norm and lm_head on the text rows asked for.
  std::vector<int64_t> out_rows;
  if (which == LogitsFor::last && !text_rows.empty()) out_rows.push_back(text_rows.back());
  if (which == LogitsFor::all) out_rows = text_rows;
  if (out_rows.empty()) return;
  xs.resize(out_rows.size() * size_t(H));
  for (size_t i = 0; i < out_rows.size(); ++i) std::copy_n(x.data() + out_rows[i] * H, H, xs.data() + i * H);
  cpu::rms_norm(xs.data(), int64_t(out_rows.size()), H, final_norm.data, final_norm.dtype, eps);
  // The first V rows of lm_head (logits truncated to logits_size).
  cpu::linear(xs.data(), int64_t(out_rows.size()), H, lm_head.data, lm_head.dtype, V, logits.data(), threads);
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
  if (opt.max_text_tokens < 0) fail("Model: max_text_tokens must be >= 0 (got ", opt.max_text_tokens, ")");
  if (cfg.rope_type != "default") fail(dir, "/config.json: rope_type \"", cfg.rope_type, "\" is not supported (default only)");
  m->ckpt = std::make_unique<Checkpoint>(Checkpoint::open(dir));
  const ModelWeights w = bind_weights(cfg, *m->ckpt);
  m->threads = opt.threads > 0 ? opt.threads : int(std::max(1u, std::thread::hardware_concurrency()));
  m->max_text = opt.max_text_tokens > 0 ? opt.max_text_tokens : cfg.max_position_embeddings;

  // Page the weights in (they are mmap'ed), reporting progress.
  {
    int64_t total = 0, done = 0, last = 0;
    for (const TensorInfo& t : m->ckpt->tensors()) total += t.nbytes;
    for (const TensorInfo& t : m->ckpt->tensors()) {
      const volatile std::byte* p = t.data;
      unsigned sink = 0;
      for (int64_t i = 0; i < t.nbytes; i += 4096) sink += unsigned(p[i]);
      (void)sink;
      done += t.nbytes;
      if (opt.progress && (done - last >= (int64_t(64) << 20) || done == total)) {
        opt.progress(done, total);
        last = done;
      }
    }
  }

  // The stream: KSA models insert summaries; plain Qwen3 is one chunk as long as the context (no summaries).
  m->summaries = cfg.use_summary_attention;
  m->spec = cfg.use_summary_attention ? cfg.layer_spec(0) : Spec{};
  if (!m->summaries) {
    m->spec.k = m->max_text + 1;
    m->spec.S = 1;
    m->spec.text_positions = TextPositions::origin;
  }
  m->spec.summarize_tail = false;
  const int64_t causal_W = m->max_text / m->spec.k + 1;  // W·k >= context: text only, causal

  m->embed = bind(w.embed_tokens);
  m->final_norm = bind(w.norm);
  m->lm_head = w.lm_head == w.embed_tokens ? m->embed : bind(w.lm_head);
  const int64_t H = cfg.hidden_size;
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
    const LayerWeights& lw = w.layers[size_t(i)];
    Layer L;
    L.in_norm = bind(lw.input_layernorm);
    L.in_norm_summary = bind(lw.input_layernorm_summary);
    L.q = bind(lw.q_proj), L.k = bind(lw.k_proj), L.v = bind(lw.v_proj), L.o = bind(lw.o_proj);
    L.q_norm = bind(lw.q_norm), L.k_norm = bind(lw.k_norm);
    if (lw.q_proj_summary && lw.k_proj_summary && lw.v_proj_summary && cfg.mix_coeff != 0.0)
      L.q_s = bind(lw.q_proj_summary), L.k_s = bind(lw.k_proj_summary), L.v_s = bind(lw.v_proj_summary);
    L.post_norm = bind(lw.post_attention_layernorm);
    L.gate = bind(lw.gate_proj), L.up = bind(lw.up_proj), L.down = bind(lw.down_proj);
    L.summary_layer = cfg.is_summary_layer(i);
    L.W = (m->summaries && L.summary_layer) ? std::min(cfg.layer_spec(i).W, causal_W) : causal_W;
    if (!L.in_norm || !L.q || !L.k || !L.v || !L.o || !L.q_norm || !L.k_norm || !L.post_norm || !L.gate || !L.up ||
        !L.down)
      fail(dir, ": layer ", i, " lacks a required tensor");
    for (const Tensor* t : {&L.in_norm, &L.q, &L.k, &L.v, &L.o, &L.q_norm, &L.k_norm, &L.post_norm, &L.gate, &L.up, &L.down})
      m->weight_bytes += t->nbytes, m->weight_bytes_token += t->nbytes;
    for (const Tensor* t : {&L.in_norm_summary, &L.q_s, &L.k_s, &L.v_s}) m->weight_bytes += t->nbytes;

    KvCacheConfig cc;
    cc.spec = m->spec;
    cc.spec.W = L.W;
    cc.Hkv = cfg.num_key_value_heads;
    cc.D = cfg.head_dim;
    cc.dtype = opt.kv_dtype;
    cc.max_text_tokens = m->max_text;
    cc.block_rows = 16;
    m->caches.emplace_back(cc);
    m->layers.push_back(std::move(L));
  }
  const int64_t head_bytes = cfg.logits_size() * H * dtype_size(m->lm_head.dtype);
  m->weight_bytes += m->final_norm.nbytes + m->embed.nbytes + (w.lm_head == w.embed_tokens ? 0 : m->lm_head.nbytes);
  m->weight_bytes_token += m->final_norm.nbytes + head_bytes + H * dtype_size(m->embed.dtype);
  return Model(std::move(m));
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
  for (KvCache& c : m.caches) s.ids.push_back(c.add_sequence());
  const SeqId id = m.next_id++;
  m.seqs.emplace(id, std::move(s));
  return id;
}

void Model::release(SeqId id) {
  Impl& m = *impl_;
  Impl::Seq& s = m.find(id, "release");
  for (size_t i = 0; i < m.caches.size(); ++i) m.caches[i].release(s.ids[i]);
  m.seqs.erase(id);
}

int64_t Model::text_tokens(SeqId id) const { return impl_->find(id, "text_tokens").T; }
int64_t Model::stream_tokens(SeqId id) const {
  const Impl::Seq& s = impl_->find(id, "stream_tokens");
  return s.T + s.sums;
}

void Model::check(const StepItem& it) const {
  const Impl& m = *impl_;
  const Impl::Seq& s = m.find(it.id, "step");
  const int64_t n = int64_t(it.tokens.size());
  if (n == 0) fail("Model::step: sequence ", it.id, ": no tokens");
  if (s.T + n > m.max_text)
    fail("Model::step: sequence ", it.id, " would hold ", s.T + n, " text tokens, past the context limit of ", m.max_text,
         " (", s.T, " already, ", n, " new)");
  for (int64_t i = 0; i < n; ++i)
    if (it.tokens[size_t(i)] < 0 || it.tokens[size_t(i)] >= m.cfg.vocab_size)
      fail("Model::step: sequence ", it.id, ": token ", i, " has id ", it.tokens[size_t(i)],
           ", outside the vocabulary [0, ", m.cfg.vocab_size, ")");
  m.check_summary_ids(it.tokens, "Model::step");
  if (it.sampler) it.sampler->validate();
}

void Model::step(std::span<const StepItem> items, StepResult& out) {
  Impl& m = *impl_;
  for (size_t i = 0; i < items.size(); ++i) {
    check(items[i]);
    for (size_t j = 0; j < i; ++j)
      if (items[j].id == items[i].id) fail("Model::step: sequence ", items[i].id, " appears twice in one step");
  }
  const int64_t V = m.cfg.logits_size();
  out.next.assign(items.size(), -1);
  out.logits.clear();
  out.logits_row.assign(items.size(), 0);
  std::vector<float> last(static_cast<size_t>(V));
  std::vector<int32_t> idx;
  std::vector<float> prob;
  int64_t row = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const StepItem& it = items[i];
    const int64_t n = int64_t(it.tokens.size());
    const int64_t rows = it.logits == LogitsFor::none ? 0 : it.logits == LogitsFor::last ? 1 : n;
    out.logits_row[i] = row;
    out.logits.resize(size_t((row + rows) * V));
    Impl::Seq& s = m.find(it.id, "step");
    if (it.sampler && it.logits != LogitsFor::last) {
      std::vector<float> tmp(size_t((it.logits == LogitsFor::all ? n : 1) * V));
      m.run(s, it.tokens, it.logits == LogitsFor::all ? LogitsFor::all : LogitsFor::last, tmp);
      std::copy(tmp.end() - V, tmp.end(), last.begin());
      if (rows) std::copy(tmp.begin(), tmp.end(), out.logits.begin() + row * V);
    } else {
      m.run(s, it.tokens, it.logits, std::span<float>(out.logits.data() + row * V, size_t(rows * V)));
      if (it.sampler) std::copy_n(out.logits.data() + row * V, V, last.begin());
    }
    row += rows;
    if (it.sampler) {
      const double u = sample_uniform(it.sampler->seed, s.draws++);
      out.next[i] = sample_token(last, it.history, *it.sampler, u, idx, prob);
    }
  }
}

void Model::append(SeqId id, std::span<const int32_t> tokens, LogitsFor which, std::span<float> logits) {
  Impl& m = *impl_;
  Impl::Seq& s = m.find(id, "append");
  const int64_t n = int64_t(tokens.size()), V = m.cfg.logits_size();
  if (s.T + n > m.max_text)
    fail("Model::append: sequence ", id, " would hold ", s.T + n, " text tokens, past the context limit of ", m.max_text,
         " (", s.T, " already, ", n, " new)");
  for (int64_t i = 0; i < n; ++i)
    if (tokens[size_t(i)] < 0 || tokens[size_t(i)] >= m.cfg.vocab_size)
      fail("Model::append: token ", i, " has id ", tokens[size_t(i)], ", outside the vocabulary [0, ", m.cfg.vocab_size, ")");
  m.check_summary_ids(tokens, "Model::append");
  const int64_t rows = which == LogitsFor::none ? 0 : which == LogitsFor::last ? (n > 0 ? 1 : 0) : n;
  if (int64_t(logits.size()) != rows * V)
    fail("Model::append: logits holds ", logits.size(), " floats; ", rows, " row(s) of ", V, " = ", rows * V, " needed");
  if (n == 0) return;
  m.run(s, tokens, which, logits);
}

int64_t Model::kv_bytes(SeqId id) const {
  const Impl& m = *impl_;
  const Impl::Seq& s = m.find(id, "kv_bytes");
  int64_t b = 0;
  for (size_t i = 0; i < m.caches.size(); ++i) b += m.caches[i].bytes_in_use(s.ids[i]);
  return b;
}

int64_t Model::kv_bytes_in_use() const {
  int64_t b = 0;
  for (const KvCache& c : impl_->caches) b += c.bytes_in_use();
  return b;
}

int64_t Model::kv_bytes_for(int64_t text_tokens) const {
  const Impl& m = *impl_;
  int64_t b = 0;
  for (const KvCache& c : m.caches) {
    const KvCacheConfig& cc = c.config();
    const int64_t T = std::min(text_tokens, m.max_text), P = cc.block_rows;
    const int64_t text = std::min(c.text_ring_rows(), (T + P - 1) / P * P) + P;
    const int64_t sums = cc.stores_summaries() ? T / cc.spec.k * cc.spec.S : cc.spec.S;
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
