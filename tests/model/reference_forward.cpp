// The naive reference forward of Qwen3-KSA (see reference_forward.hpp). Follows docs/ksa.md: The model step by step;
// deliberately slow and simple.
#include "reference_forward.hpp"

#include <algorithm>
#include <cmath>

#include "ksa/error.hpp"
#include "ksa/safetensors.hpp"
#include "ksa/spec.hpp"

namespace ksa::test {
namespace {

std::vector<float> tensor(const Checkpoint& c, const std::string& name, bool required = true) {
  const TensorInfo* t = c.find(name);
  if (!t) {
    if (required) fail("reference: ", c.dir(), " has no tensor ", name);
    return {};
  }
  return t->to_f32();
}

// x <- x / sqrt(mean(x^2) + eps) * w  (HF Qwen3RMSNorm)
template <class R>
void rms_norm(R* x, int64_t n, const std::vector<float>& w, R eps) {
  R ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const R r = R(1) / std::sqrt(ss / R(n) + eps);
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * r * R(w[size_t(i)]);
}

// y[N] = W[N, K] x[K]  (torch Linear, weight [out, in])
template <class R>
void linear(const R* x, const std::vector<float>& W, int64_t N, int64_t K, R* y) {
  for (int64_t n = 0; n < N; ++n) {
    R acc = 0;
    const float* w = W.data() + n * K;
    for (int64_t k = 0; k < K; ++k) acc += R(w[k]) * x[k];
    y[n] = acc;
  }
}

// HF rotate_half RoPE on one head: pairs (i, i + D/2), inv_freq = theta^(-2i/D).
template <class R>
void rope(R* v, int64_t D, int64_t pos, double theta) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const R inv_freq = std::pow(R(theta), -R(2 * i) / R(D));
    const R angle = R(pos) * inv_freq;
    const R c = std::cos(angle), s = std::sin(angle);
    const R a = v[i], b = v[i + half];
    v[i] = a * c - b * s;
    v[i + half] = b * c + a * s;
  }
}

}  // namespace

ReferenceModel::ReferenceModel(const std::string& dir) {
  cfg_ = ModelConfig::load(dir);
  const Checkpoint c = Checkpoint::open(dir);
  embed_ = tensor(c, "model.embed_tokens.weight");
  norm_ = tensor(c, "model.norm.weight");
  if (!cfg_.tie_word_embeddings) lm_head_ = tensor(c, "lm_head.weight");
  for (int64_t i = 0; i < cfg_.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    Layer L;
    L.in_norm = tensor(c, p + "input_layernorm.weight");
    L.q = tensor(c, p + "self_attn.q_proj.weight");
    L.k = tensor(c, p + "self_attn.k_proj.weight");
    L.v = tensor(c, p + "self_attn.v_proj.weight");
    L.o = tensor(c, p + "self_attn.o_proj.weight");
    L.q_norm = tensor(c, p + "self_attn.q_norm.weight");
    L.k_norm = tensor(c, p + "self_attn.k_norm.weight");
    L.post_norm = tensor(c, p + "post_attention_layernorm.weight");
    L.gate = tensor(c, p + "mlp.gate_proj.weight");
    L.up = tensor(c, p + "mlp.up_proj.weight");
    L.down = tensor(c, p + "mlp.down_proj.weight");
    // docs/ksa.md (Parameters, The model): the summary projections take part only with independent parameters and mix
    // != 0, and only when present; the summary layernorm only when configured (and present).
    if (cfg_.uses_summary_projections()) {
      L.q_s = tensor(c, p + "self_attn.q_proj_summary.weight", false);
      L.k_s = tensor(c, p + "self_attn.k_proj_summary.weight", false);
      L.v_s = tensor(c, p + "self_attn.v_proj_summary.weight", false);
      L.blend = !L.q_s.empty() && !L.k_s.empty() && !L.v_s.empty();
    }
    if (cfg_.uses_summary_layernorm()) {
      L.in_norm_summary = tensor(c, p + "input_layernorm_summary.weight", false);
      L.summary_norm = !L.in_norm_summary.empty();
    }
    layers_.push_back(std::move(L));
  }
}

template <class R>
std::vector<double> ReferenceModel::run(std::span<const int32_t> text) const {
  const ModelConfig& c = cfg_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, Hq = c.num_attention_heads, Hkv = c.num_key_value_heads,
                D = c.head_dim, V = c.logits_size(), T = int64_t(text.size());
  const int64_t group = Hq / Hkv;
  const R eps = R(c.rms_norm_eps);
  const R scale = R(1) / std::sqrt(R(D));

  // The stream (docs/ksa.md: The stream): text with S summaries after each full chunk, no tail summary; plain Qwen3
  // when use_summary_attention is false.
  Spec spec;
  Stream st;
  if (c.use_summary_attention) {
    spec = c.layer_spec(0);
    spec.summarize_tail = false;
    st = build_stream(spec, text);
  } else {
    st.ids.assign(text.begin(), text.end());
    st.is_summary.assign(size_t(T), 0);
    st.positions.resize(size_t(T));
    for (int64_t t = 0; t < T; ++t) st.positions[size_t(t)] = t;
  }
  const int64_t L = int64_t(st.ids.size());

  std::vector<R> x(static_cast<size_t>(L * H));
  for (int64_t r = 0; r < L; ++r)
    for (int64_t i = 0; i < H; ++i) x[size_t(r * H + i)] = R(embed_[size_t(int64_t(st.ids[size_t(r)]) * H + i)]);

  const auto n = [](int64_t x) { return static_cast<size_t>(x); };
  std::vector<R> h(n(H)), q(n(L * Hq * D)), k(n(L * Hkv * D)), v(n(L * Hkv * D)), att(n(L * Hq * D)), tmp(n(Hq * D)),
      o(n(H)), g(n(I)), u(n(I)), p(n(L));

  for (int64_t li = 0; li < c.num_hidden_layers; ++li) {
    const Layer& ly = layers_[size_t(li)];
    const bool ksa_layer = c.is_summary_layer(li);
    const int64_t W = c.use_summary_attention ? c.layer_spec(li).W : 0;
    // Rows this layer updates: all in a summary-attention layer; text only otherwise (summary tokens pass
    // through a plain causal layer unchanged).
    auto active = [&](int64_t r) { return ksa_layer || !st.is_summary[size_t(r)]; };

    // Input norm and q, k, v (summary tokens: their own layernorm and blended projections when configured).
    for (int64_t r = 0; r < L; ++r) {
      if (!active(r)) continue;
      const bool summ = st.is_summary[size_t(r)] != 0;
      for (int64_t i = 0; i < H; ++i) h[size_t(i)] = x[size_t(r * H + i)];
      rms_norm(h.data(), H, summ && ly.summary_norm ? ly.in_norm_summary : ly.in_norm, eps);
      R* qr = q.data() + r * Hq * D;
      R* kr = k.data() + r * Hkv * D;
      R* vr = v.data() + r * Hkv * D;
      linear(h.data(), ly.q, Hq * D, H, qr);
      linear(h.data(), ly.k, Hkv * D, H, kr);
      linear(h.data(), ly.v, Hkv * D, H, vr);
      if (summ && ly.blend) {
        const R mix = R(c.mix_coeff);
        struct {
          const std::vector<float>& w;
          R* y;
          int64_t n;
        } ps[3] = {{ly.q_s, qr, Hq * D}, {ly.k_s, kr, Hkv * D}, {ly.v_s, vr, Hkv * D}};
        for (auto& pj : ps) {
          linear(h.data(), pj.w, pj.n, H, tmp.data());
          for (int64_t i = 0; i < pj.n; ++i) pj.y[i] = mix * tmp[size_t(i)] + (R(1) - mix) * pj.y[i];
        }
      }
      for (int64_t hh = 0; hh < Hq; ++hh) rms_norm(qr + hh * D, D, ly.q_norm, eps);
      for (int64_t hh = 0; hh < Hkv; ++hh) rms_norm(kr + hh * D, D, ly.k_norm, eps);
      const int64_t pos = st.positions[size_t(r)];
      for (int64_t hh = 0; hh < Hq; ++hh) rope(qr + hh * D, D, pos, c.rope_theta);
      for (int64_t hh = 0; hh < Hkv; ++hh) rope(kr + hh * D, D, pos, c.rope_theta);
    }

    // Attention with a full probability row per query.
    for (int64_t r = 0; r < L; ++r) {
      if (!active(r)) continue;
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const int64_t hk = hq / group;
        const R* qv = q.data() + (r * Hq + hq) * D;
        R mx = -INFINITY;
        for (int64_t j = 0; j < L; ++j) {
          // KSA layers: THE rule (ksa::visible). Plain causal layers (and plain Qwen3): text keys up to r.
          const bool vis = ksa_layer ? visible(st.layout, W, r, j) : (!st.is_summary[size_t(j)] && j <= r);
          if (!vis) {
            p[size_t(j)] = -INFINITY;
            continue;
          }
          R s = 0;
          const R* kv = k.data() + (j * Hkv + hk) * D;
          for (int64_t d = 0; d < D; ++d) s += qv[d] * kv[d];
          p[size_t(j)] = s * scale;
          mx = std::max(mx, p[size_t(j)]);
        }
        R sum = 0;
        for (int64_t j = 0; j < L; ++j) {
          p[size_t(j)] = p[size_t(j)] == -INFINITY ? R(0) : std::exp(p[size_t(j)] - mx);
          sum += p[size_t(j)];
        }
        R* out = att.data() + (r * Hq + hq) * D;
        for (int64_t d = 0; d < D; ++d) {
          R acc = 0;
          for (int64_t j = 0; j < L; ++j)
            if (p[size_t(j)] != R(0)) acc += p[size_t(j)] * v[size_t((j * Hkv + hk) * D + d)];
          out[d] = acc / sum;
        }
      }
    }

    // o_proj, residual, post-attention norm, SwiGLU MLP, residual.
    for (int64_t r = 0; r < L; ++r) {
      if (!active(r)) continue;
      R* xr = x.data() + r * H;
      linear(att.data() + r * Hq * D, ly.o, H, Hq * D, o.data());
      for (int64_t i = 0; i < H; ++i) xr[i] += o[size_t(i)];
      for (int64_t i = 0; i < H; ++i) h[size_t(i)] = xr[i];
      rms_norm(h.data(), H, ly.post_norm, eps);
      linear(h.data(), ly.gate, I, H, g.data());
      linear(h.data(), ly.up, I, H, u.data());
      for (int64_t i = 0; i < I; ++i) g[size_t(i)] = g[size_t(i)] / (R(1) + std::exp(-g[size_t(i)])) * u[size_t(i)];
      linear(g.data(), ly.down, H, I, o.data());
      for (int64_t i = 0; i < H; ++i) xr[i] += o[size_t(i)];
    }
  }

  // model.norm and lm_head (embed_tokens when tied) at the text positions, first V rows.
  const std::vector<float>& head = c.tie_word_embeddings ? embed_ : lm_head_;
  std::vector<double> out(static_cast<size_t>(T * V));
  std::vector<R> y(static_cast<size_t>(V));
  int64_t t = 0;
  for (int64_t r = 0; r < L; ++r) {
    if (st.is_summary[size_t(r)]) continue;
    for (int64_t i = 0; i < H; ++i) h[size_t(i)] = x[size_t(r * H + i)];
    rms_norm(h.data(), H, norm_, eps);
    linear(h.data(), head, V, H, y.data());
    for (int64_t i = 0; i < V; ++i) out[size_t(t * V + i)] = double(y[size_t(i)]);
    ++t;
  }
  if (t != T) fail("reference: ", t, " text rows in the stream, expected ", T);
  return out;
}

std::vector<double> ReferenceModel::logits(std::span<const int32_t> text) const { return run<double>(text); }
std::vector<double> ReferenceModel::logits_f32(std::span<const int32_t> text) const { return run<float>(text); }

}  // namespace ksa::test
