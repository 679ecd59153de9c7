// The weight table against checkpoints written by write_random_model: binding, optional and ignored
// tensors, one message listing every problem, sane random values, and the `ksa make-model` / `ksa info -m`
// commands end to end.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>

#include "ksa/error.hpp"
#include "ksa/model_writer.hpp"
#include "ksa/safetensors.hpp"
#include "ksa/weights.hpp"
#include "test_util.hpp"

namespace ksa {
namespace {

namespace fs = std::filesystem;

using test::error_of;

// A tiny config with a small vocabulary, so that tests write kilobytes.
ModelConfig mini(bool tied = true) {
  ModelConfig c = model_shape_config("tiny");
  c.vocab_size = 300;
  c.summary_token_begin = 299;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  c.tie_word_embeddings = tied;
  c.validate();
  return c;
}

// Rewrites a checkpoint with `edit` applied to its tensors (name -> (shape, values)).
void rewrite(
    const std::string& dir,
    const std::function<void(std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>&)>& edit) {
  std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> ts;
  {
    const Checkpoint c = Checkpoint::open(dir);
    for (const TensorInfo& t : c.tensors()) ts[t.name] = {t.shape, t.to_f32()};
  }
  edit(ts);
  SafetensorsWriter w;
  for (auto& [name, sv] : ts) w.add(name, DType::f32, sv.first, sv.second.data());
  w.write_checkpoint(dir, int64_t(1) << 30);
}

TEST(Weights, TableFollowsTheConfig) {
  const ModelConfig c = model_shape_config("4b");
  const std::vector<ExpectedTensor> e = expected_tensors(c);
  auto find = [&](const std::string& n) -> const ExpectedTensor& {
    for (const ExpectedTensor& x : e)
      if (x.name == n) return x;
    throw Error("not in table: " + n);
  };
  EXPECT_EQ(find("model.embed_tokens.weight").shape, (std::vector<int64_t>{151937, 2560}));
  EXPECT_EQ(find("model.layers.35.self_attn.q_proj.weight").shape, (std::vector<int64_t>{4096, 2560}));
  EXPECT_EQ(find("model.layers.0.self_attn.k_proj.weight").shape, (std::vector<int64_t>{1024, 2560}));
  EXPECT_EQ(find("model.layers.0.self_attn.o_proj.weight").shape, (std::vector<int64_t>{2560, 4096}));
  EXPECT_EQ(find("model.layers.0.self_attn.q_norm.weight").shape, (std::vector<int64_t>{128}));
  EXPECT_EQ(find("model.layers.0.mlp.down_proj.weight").shape, (std::vector<int64_t>{2560, 9728}));
  EXPECT_EQ(find("lm_head.weight").use, TensorUse::ignored);                                  // tied
  EXPECT_EQ(find("model.layers.0.self_attn.q_proj_summary.weight").use, TensorUse::ignored);  // mix_coeff 0
  EXPECT_EQ(find("model.layers.0.input_layernorm_summary.weight").use, TensorUse::ignored);
  const ModelConfig t = model_shape_config("tiny");  // mix_coeff 0.5, independent layernorm
  for (const ExpectedTensor& x : expected_tensors(t)) {
    if (x.name == "model.layers.1.self_attn.v_proj_summary.weight" ||
        x.name == "model.layers.1.input_layernorm_summary.weight") {
      EXPECT_EQ(x.use, TensorUse::optional) << x.name;
    }
  }
  // Qwen3-4B's parameter count (tied embeddings) plus the summary row: 4,022,468,096 + 2,560.
  EXPECT_EQ(count_parameters(c), 4022468096 + 2560);
}

TEST(Weights, BindsARandomCheckpoint) {
  test::TempDir d{"w"};
  const ModelConfig c = mini();
  const WrittenModel wm =
      write_random_model(c, d.str(), RandomModelOptions{7, DType::bf16, int64_t(1) << 30, true, ""});
  EXPECT_FALSE(wm.tokenizer_copied);
  const ModelConfig back = ModelConfig::load(d.str());
  EXPECT_EQ(back.to_json(), c.to_json());
  const Checkpoint ck = Checkpoint::open(d.str());
  const ModelWeights w = bind_weights(back, ck);
  EXPECT_EQ(w.parameters, count_parameters(back));
  EXPECT_EQ(w.parameters, wm.parameters);
  ASSERT_EQ(w.layers.size(), 4u);
  EXPECT_EQ(w.lm_head, w.embed_tokens);  // tied
  for (const LayerWeights& L : w.layers) {
    ASSERT_TRUE(L.q_proj && L.k_proj && L.v_proj && L.o_proj && L.q_norm && L.k_norm && L.gate_proj && L.up_proj &&
                L.down_proj);
    EXPECT_TRUE(L.q_proj_summary && L.k_proj_summary && L.v_proj_summary);  // mix_coeff 0.5: used
    EXPECT_TRUE(L.input_layernorm_summary);
    EXPECT_EQ(L.q_proj->dtype, DType::bf16);
  }
  // Sane values: finite, scaled as documented.
  const std::vector<float> q = w.layers[0].q_proj->to_f32();
  double ss = 0;
  for (float x : q) {
    ASSERT_TRUE(std::isfinite(x));
    ss += double(x) * x;
  }
  EXPECT_NEAR(std::sqrt(ss / double(q.size())), 1.0 / std::sqrt(64.0), 0.02);
  const std::vector<float> n = w.layers[0].input_layernorm->to_f32();
  for (float x : n) EXPECT_NEAR(x, 1.0, 0.1);
  // Same seed, same bytes; another seed, other values.
  test::TempDir d2{"w"}, d3{"w"};
  write_random_model(c, d2.str(), RandomModelOptions{7, DType::bf16, int64_t(1) << 30, true, ""});
  write_random_model(c, d3.str(), RandomModelOptions{8, DType::bf16, int64_t(1) << 30, true, ""});
  EXPECT_EQ(Checkpoint::open(d2.str()).at("model.norm.weight").to_f32(), ck.at("model.norm.weight").to_f32());
  EXPECT_NE(Checkpoint::open(d3.str()).at("model.norm.weight").to_f32(), ck.at("model.norm.weight").to_f32());
}

TEST(Weights, OptionalAndIgnoredTensors) {
  test::TempDir d{"w"};
  ModelConfig c = mini(false);  // untied: lm_head required
  write_random_model(c, d.str(), RandomModelOptions{1, DType::f32, int64_t(1) << 30, false, ""});
  const Checkpoint ck = Checkpoint::open(d.str());
  const ModelWeights w = bind_weights(c, ck);  // no summary projections: optional, absent -> null
  EXPECT_EQ(w.layers[0].q_proj_summary, nullptr);
  EXPECT_NE(w.lm_head, w.embed_tokens);
  // mix_coeff 0: summary projections present but ignored (null), not counted.
  test::TempDir d2{"w"};
  c.mix_coeff = 0;
  write_random_model(c, d2.str(), RandomModelOptions{1, DType::f32, int64_t(1) << 30, true, ""});
  const Checkpoint ck2 = Checkpoint::open(d2.str());
  ASSERT_NE(ck2.find("model.layers.0.self_attn.q_proj_summary.weight"), nullptr);
  const ModelWeights w2 = bind_weights(c, ck2);
  EXPECT_EQ(w2.layers[0].q_proj_summary, nullptr);
  EXPECT_EQ(w2.parameters, count_parameters(c));
}

TEST(WeightsErrors, OneMessageListsEveryProblem) {
  test::TempDir d{"w"};
  const ModelConfig c = mini(false);
  write_random_model(c, d.str(), RandomModelOptions{3, DType::f32, int64_t(1) << 30, true, ""});
  rewrite(d.str(), [](auto& ts) {
    ts.erase("model.layers.2.mlp.up_proj.weight");
    ts.erase("lm_head.weight");
    ts["model.layers.1.self_attn.k_proj.weight"].first = {16, 64};  // was [32, 64]
    ts["model.layers.1.self_attn.k_proj.weight"].second.resize(16 * 64);
    ts.erase("model.layers.3.self_attn.k_proj_summary.weight");
    ts["model.extra.weight"] = {{2}, {1.f, 2.f}};
  });
  const Checkpoint ck = Checkpoint::open(d.str());
  EXPECT_EQ(error_of([&] { bind_weights(c, ck); }),
            d.str() +
                ": checkpoint does not match config.json (5 problems):\n"
                "  model.layers.1.self_attn.k_proj.weight: shape [16, 64], expected [32, 64]\n"
                "  missing tensor model.layers.2.mlp.up_proj.weight [192, 64]\n"
                "  missing tensor lm_head.weight [300, 64]\n"
                "  unexpected tensor model.extra.weight [2] (in " +
                d.path("model.safetensors") +
                ")\n"
                "  layer 3: has some summary projections but not k_proj_summary (all three or none)");
}

TEST(WeightsErrors, WrongShapeOfEmbeddings) {
  test::TempDir d{"w"};
  ModelConfig c = mini();
  write_random_model(c, d.str(), RandomModelOptions{3, DType::bf16, int64_t(1) << 30, true, ""});
  c.vocab_size = 301;  // the config says one row more than the file has
  const Checkpoint ck = Checkpoint::open(d.str());
  EXPECT_EQ(error_of([&] { check_weights(c, ck); }),
            d.str() +
                ": checkpoint does not match config.json (1 problem):\n"
                "  model.embed_tokens.weight: shape [300, 64], expected [301, 64]");
}

// The commands, end to end (the ksa binary is built next to the tests).
std::string run(const std::string& cmd, int* rc) { return test::run_command(cmd, rc); }

TEST(KsaCommand, MakeModelThenInfo) {
  const std::string ksa = std::string(KSA_BINARY_DIR) + "/bin/ksa";
  if (!fs::exists(ksa)) GTEST_SKIP() << ksa << " not built";
  test::TempDir d{"w"};
  int rc = 0;
  const std::string made =
      run(ksa + " make-model --shape tiny --seed 3 --shard-mb 8 --tokenizer /nonexistent-dir --out " + d.str(), &rc);
  EXPECT_NE(rc, 0) << made;  // an explicit --tokenizer folder must exist
  EXPECT_NE(made.find("/nonexistent-dir: has no tokenizer.json to copy"), std::string::npos) << made;
  const std::string out =
      run("KSA_TOKENIZER_DIR= " + ksa + " make-model --shape tiny --seed 3 --shard-mb 8 --out " + d.str(), &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_TRUE(fs::exists(d.path("model.safetensors.index.json"))) << "19 MB of weights in 8 MiB shards";
  EXPECT_TRUE(fs::exists(d.path("config.json")));
  const bool has_tok = fs::exists(d.path("tokenizer.json"));
  if (!has_tok) {
    EXPECT_NE(out.find("warning: no tokenizer copied"), std::string::npos) << out;
  }
  const std::string info = run(ksa + " info -m " + d.str(), &rc);
  ASSERT_EQ(rc, 0) << info;
  EXPECT_NE(
      info.find("architecture: qwen3 + KSA, 4 layers, hidden 64, intermediate 192, heads 4/2 (GQA 2), head_dim 16"),
      std::string::npos)
      << info;
  EXPECT_NE(info.find("parameters: 9,954,304"), std::string::npos) << info;
  EXPECT_NE(info.find("W=2       (16 text tokens seen as text): layers 0-2"), std::string::npos) << info;
  EXPECT_NE(info.find("KV cache"), std::string::npos) << info;
  EXPECT_NE(info.find(has_tok ? "tokenizer: vocabulary 151669" : "tokenizer: none"), std::string::npos) << info;

  // A broken directory: one clear line, nonzero exit, no crash.
  std::ofstream(d.path("config.json"), std::ios::trunc) << "{\"hidden_size\": 64,";
  const std::string bad = run(ksa + " info -m " + d.str(), &rc);
  EXPECT_EQ(WEXITSTATUS(rc), 1);
  EXPECT_EQ(bad.rfind("ksa info: error: " + d.path("config.json") + ": invalid JSON: parse error at line 1", 0), 0u)
      << bad;
  EXPECT_EQ(std::count(bad.begin(), bad.end(), '\n'), 1) << bad;
  const std::string missing = run(ksa + " info -m " + d.path("nothing"), &rc);
  EXPECT_EQ(WEXITSTATUS(rc), 1);
  EXPECT_EQ(missing, "ksa info: error: " + d.path("nothing") + "/config.json: cannot open config.json\n");
}

}  // namespace
}  // namespace ksa
