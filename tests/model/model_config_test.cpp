// config.json -> ModelConfig: the released format, the variants newer transformers write, summary_layer_freq
// in all its forms, defaults, the writer's round trip, and errors that name the field and the value.
#include <gtest/gtest.h>

#include <functional>
#include <nlohmann/json.hpp>

#include "ksa/error.hpp"
#include "ksa/model_config.hpp"
#include "ksa/model_writer.hpp"
#include "test_util.hpp"

namespace ksa {
namespace {

using Json = nlohmann::json;

// KSA-4B-base's config.json as released (the HF template's keys with the 4B values; vocab_size synced to
// the checkpoint's 151937 rows by the release's converter).
const char* kReleased = R"({
  "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "eos_token_id": 151643, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
  "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 131072, "max_window_layers": 36,
  "mix_coeff": 0.0, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
  "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000,
  "sliding_window": null, "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
  "use_cache": true, "use_sliding_window": false, "vocab_size": 151937, "summary_token_begin": 151936,
  "summary_chunk_size": 8, "summary_token_num": 1, "use_summary_attention": true,
  "summary_sliding_chunk_num": "([128]*3+[16768]*1)*9", "summary_chunk_position_ids_type": "origin",
  "summary_token_position_ids_type": "last_chunk_slice_right", "summary_independent_parameters": true,
  "summary_independent_attention_layernorm": false, "summary_attention_mode": "kernel",
  "auto_map": {"AutoModel": "modeling_qwen3sa.Qwen3Model", "AutoModelForCausalLM": "modeling_qwen3sa.Qwen3ForCausalLM"}
})";

Json released() { return Json::parse(kReleased); }
ModelConfig parse(const Json& j) { return ModelConfig::parse(j.dump(), "cfg.json"); }

using test::error_of;
std::string error_with(const std::function<void(Json&)>& edit) {
  Json j = released();
  edit(j);
  return error_of([&] { parse(j); });
}

TEST(ModelConfig, ReadsTheReleasedConfig) {
  const ModelConfig c = parse(released());
  EXPECT_EQ(c.hidden_size, 2560);
  EXPECT_EQ(c.intermediate_size, 9728);
  EXPECT_EQ(c.num_hidden_layers, 36);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(c.vocab_size, 151937);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 151643);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{151643});
  EXPECT_EQ(c.dtype, DType::bf16);
  EXPECT_TRUE(c.use_summary_attention);
  EXPECT_EQ(c.summary_chunk_size, 8);
  EXPECT_EQ(c.summary_token_num, 1);
  EXPECT_EQ(c.summary_token_begin, 151936);
  EXPECT_EQ(c.text_positions, TextPositions::origin);
  EXPECT_EQ(c.summary_positions, SummaryPositions::last_chunk_slice_right);
  EXPECT_TRUE(c.summary_independent_parameters);
  EXPECT_EQ(c.mix_coeff, 0.0);
  EXPECT_FALSE(c.summary_independent_attention_layernorm);
  EXPECT_FALSE(c.uses_summary_projections());
  EXPECT_EQ(c.truncate_predict_nums, 151936);
  EXPECT_EQ(c.logits_size(), 151936);
  ASSERT_EQ(c.windows.size(), 36u);
  for (int i = 0; i < 36; ++i) EXPECT_EQ(c.windows[size_t(i)], i % 4 == 3 ? 16768 : 128) << i;
  EXPECT_EQ(c.num_summary_layers(), 36);
  EXPECT_EQ(c.layer_spec(3).W, 16768);
  EXPECT_EQ(c.layer_spec(4).W, 128);
  EXPECT_EQ(c.q_dim(), 4096);
  EXPECT_EQ(c.kv_dim(), 1024);
}

TEST(ModelConfig, AcceptsNewerTransformersVariants) {
  Json j = released();
  j.erase("rope_theta");
  j.erase("torch_dtype");
  j["rope_parameters"] = {{"rope_theta", 5000000.0}, {"rope_type", "default"}};
  j["dtype"] = "float16";
  j["layer_types"] = std::vector<std::string>(36, "full_attention");
  j["eos_token_id"] = {151645, 151643};
  j["truncate_predict_nums"] = 151000;
  const ModelConfig c = parse(j);
  EXPECT_DOUBLE_EQ(c.rope_theta, 5e6);
  EXPECT_EQ(c.dtype, DType::f16);
  EXPECT_EQ(c.layer_types.size(), 36u);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{151645, 151643}));
  EXPECT_EQ(c.logits_size(), 151000);
  // Window as an int and as a list.
  j["summary_sliding_chunk_num"] = 64;
  EXPECT_EQ(parse(j).windows, std::vector<int64_t>(36, 64));
  j["summary_sliding_chunk_num"] = std::vector<int64_t>(36, 7);
  EXPECT_EQ(parse(j).windows, std::vector<int64_t>(36, 7));
}

TEST(ModelConfig, SummaryLayerFreqForms) {
  Json j = released();
  auto flags = [&](const Json& v) {
    j["summary_layer_freq"] = v;
    const ModelConfig c = parse(j);
    return std::vector<int>(c.summary_layers.begin(), c.summary_layers.end());
  };
  const std::vector<int> all(36, 1);
  EXPECT_EQ(flags(nullptr), all);  // absent / null: every layer
  EXPECT_EQ(flags(0), all);        // 0: every layer (the framework's rule)
  EXPECT_EQ(flags(Json::array()), all);
  std::vector<int> every3(36);
  for (int i = 0; i < 36; ++i) every3[size_t(i)] = i % 3 == 0;
  EXPECT_EQ(flags(3), every3);  // int N: layers i % N == 0
  EXPECT_EQ(flags("3"), every3);
  std::vector<int> hybrid(36);
  for (int i = 0; i < 36; ++i) hybrid[size_t(i)] = i % 4 != 3;
  EXPECT_EQ(flags("([1]*3+[0]*1)*9"), hybrid);  // pattern string
  EXPECT_EQ(flags(Json(std::vector<int>(hybrid))), hybrid);
  j["summary_layer_freq"] = "([1]*3+[0]*1)*9";
  const ModelConfig c = parse(j);
  EXPECT_TRUE(c.is_summary_layer(0));
  EXPECT_FALSE(c.is_summary_layer(3));
  EXPECT_EQ(c.num_summary_layers(), 27);
  // use_summary_attention false: a plain Qwen3 model, every layer plain.
  Json p = released();
  p["use_summary_attention"] = false;
  EXPECT_EQ(parse(p).num_summary_layers(), 0);
}

TEST(ModelConfig, Defaults) {
  const ModelConfig c = parse(Json{{"hidden_size", 64},
                                   {"intermediate_size", 128},
                                   {"num_hidden_layers", 2},
                                   {"num_attention_heads", 4},
                                   {"vocab_size", 1000}});
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.dtype, DType::bf16);
  EXPECT_FALSE(c.use_summary_attention);
  EXPECT_EQ(c.summary_chunk_size, 8);
  EXPECT_EQ(c.summary_token_num, 1);
  EXPECT_EQ(c.windows, (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(c.logits_size(), 1000);
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_TRUE(c.eos_token_ids.empty());
}

TEST(ModelConfig, WriterRoundTrip) {
  for (const char* shape : {"tiny", "small", "4b"}) {
    const ModelConfig a = model_shape_config(shape);
    const std::string text = a.to_json();
    const ModelConfig b = ModelConfig::parse(text, "written.json");
    EXPECT_EQ(b.to_json(), text) << shape;
    EXPECT_EQ(b.windows, a.windows) << shape;
    EXPECT_EQ(b.summary_layers, a.summary_layers) << shape;
    EXPECT_TRUE(Json::parse(text)["summary_sliding_chunk_num"].is_string()) << "released form: a pattern string";
  }
  EXPECT_EQ(Json::parse(model_shape_config("4b").to_json())["summary_sliding_chunk_num"], "([128]*3+[16768]*1)*9");
  ModelConfig h = parse(released());
  h.summary_layers[3] = 0;
  h.summary_layers[7] = 0;
  EXPECT_EQ(ModelConfig::parse(h.to_json()).summary_layers, h.summary_layers);
  EXPECT_EQ(error_of([] { model_shape_config("huge"); }), "shape: must be tiny, small or 4b (got \"huge\")");
}

TEST(ModelConfig, DescribesLayerValues) {
  std::vector<int64_t> v;
  for (int r = 0; r < 9; ++r) v.insert(v.end(), {128, 128, 128, 16768});
  EXPECT_EQ(describe_layer_values(v), "([128]*3+[16768]*1)*9");
  EXPECT_EQ(describe_layer_values(std::vector<int64_t>(5, 7)), "[7]*5");
  EXPECT_EQ(describe_layer_values({1, 2, 2}), "[1]*1+[2]*2");
}

TEST(ModelConfigErrors, NameTheFieldAndValue) {
  EXPECT_EQ(error_of([] { ModelConfig::parse("{\"hidden_size\": 12,", "cfg.json"); }),
            "cfg.json: invalid JSON: parse error at line 1, column 20: syntax error while parsing object key - "
            "unexpected end of "
            "input; expected string literal");
  EXPECT_EQ(error_of([] { ModelConfig::parse("[1, 2]", "cfg.json"); }),
            "cfg.json: top level: must be a JSON object (got [1,2])");
  EXPECT_EQ(error_with([](Json& j) { j.erase("hidden_size"); }), "cfg.json: hidden_size: missing (required)");
  EXPECT_EQ(error_with([](Json& j) { j["hidden_size"] = "2560"; }),
            "cfg.json: hidden_size: must be an integer (got \"2560\")");
  EXPECT_EQ(error_with([](Json& j) { j["hidden_size"] = 0; }), "cfg.json: hidden_size: must be in [1, 2^20] (got 0)");
  EXPECT_EQ(error_with([](Json& j) { j["num_key_value_heads"] = 5; }),
            "cfg.json: num_key_value_heads: must be a divisor of num_attention_heads=32 (got 5)");
  EXPECT_EQ(error_with([](Json& j) { j["head_dim"] = 127; }),
            "cfg.json: head_dim: must be even and in [2, 1024] (got 127)");
  EXPECT_EQ(error_with([](Json& j) { j["rms_norm_eps"] = -1; }), "cfg.json: rms_norm_eps: must be > 0 (got -1)");
  EXPECT_EQ(error_with([](Json& j) { j["tie_word_embeddings"] = 1; }),
            "cfg.json: tie_word_embeddings: must be true or false (got 1)");
  EXPECT_EQ(error_with([](Json& j) {
              j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
            }),
            "cfg.json: rope_scaling: RoPE type \"yarn\" is not supported (only the default, unscaled RoPE)");
  EXPECT_EQ(error_with([](Json& j) {
              j["rope_parameters"] = {{"rope_theta", 1e6}, {"rope_type", "llama3"}};
            }),
            "cfg.json: rope_parameters: RoPE type \"llama3\" is not supported (only the default, unscaled RoPE)");
  EXPECT_EQ(error_with([](Json& j) { j["torch_dtype"] = "float64"; }),
            "cfg.json: torch_dtype: \"float64\" is not supported (bfloat16, float16 or float32)");
  EXPECT_EQ(error_with([](Json& j) { j["model_type"] = "llama"; }),
            "cfg.json: model_type: \"llama\" is not supported (only \"qwen3\", with or without KSA)");
  EXPECT_EQ(error_with([](Json& j) { j["hidden_act"] = "gelu"; }),
            "cfg.json: hidden_act: \"gelu\" is not supported (only \"silu\")");
  EXPECT_EQ(error_with([](Json& j) { j["layer_types"] = std::vector<std::string>(36, "sliding_attention"); }),
            "cfg.json: layer_types: layer 0 is \"sliding_attention\"; only \"full_attention\" is supported");
  EXPECT_EQ(error_with([](Json& j) { j["summary_sliding_chunk_num"] = "([128]*3+[16768]*1)*8"; }),
            "cfg.json: summary_sliding_chunk_num: has 32 entries but the model has 36 layers (pattern "
            "\"([128]*3+[16768]*1)*8\")");
  EXPECT_EQ(error_with([](Json& j) { j["summary_sliding_chunk_num"] = "([128]*3+[16768]*1)**9"; }),
            "cfg.json: summary_sliding_chunk_num: '**' is not allowed at character 20\n  ([128]*3+[16768]*1)**9\n      "
            "                ^");
  EXPECT_EQ(error_with([](Json& j) { j["summary_sliding_chunk_num"] = "__import__('os')"; }),
            "cfg.json: summary_sliding_chunk_num: unexpected '_' (only integers, lists, '+', '*' and parentheses are "
            "allowed) at "
            "character 0\n  __import__('os')\n  ^");
  EXPECT_EQ(error_with([](Json& j) { j["summary_sliding_chunk_num"] = 1.5; }),
            "cfg.json: summary_sliding_chunk_num: must be an integer, a list or a pattern string (got 1.5)");
  EXPECT_EQ(error_with([](Json& j) { j["summary_layer_freq"] = "([1]*3+[2]*1)*9"; }),
            "cfg.json: summary_layer_freq: layer 3 has value 2, must be in [0, 1]");
  EXPECT_EQ(
      error_with([](Json& j) { j["summary_layer_freq"] = -2; }),
      "cfg.json: summary_layer_freq: must be 0 (every layer), a positive period, a list or a pattern string (got -2)");
  EXPECT_EQ(error_with([](Json& j) {
              j["use_summary_attention"] = false;
              j["summary_layer_freq"] = "[1]*36";
            }),
            "cfg.json: summary_layer_freq: layer 0 is a summary layer but use_summary_attention is false");
  EXPECT_EQ(error_with([](Json& j) { j["summary_token_position_ids_type"] = "middle"; }),
            "cfg.json: summary_token_position_ids_type: must be \"zeros\", \"last_chunk_slice_left\" or "
            "\"last_chunk_slice_right\" (got \"middle\")");
  EXPECT_EQ(
      error_with([](Json& j) { j["vocab_size"] = 151936; }),
      "cfg.json: summary_token_begin: summary ids 151936..151936 need vocab_size >= 151937 (got vocab_size 151936)");
  EXPECT_EQ(error_with([](Json& j) { j["summary_chunk_size"] = 0; }),
            "cfg.json: chunk_size (summary_chunk_size): must be in [1, 1048576] (got 0)");
  EXPECT_EQ(error_with([](Json& j) { j["mix_coeff"] = 1.5; }), "cfg.json: mix_coeff: must be in [0, 1] (got 1.5)");
  EXPECT_EQ(error_with([](Json& j) { j["eos_token_id"] = 200000; }),
            "cfg.json: eos_token_id: must be a token id < vocab_size (got 200000)");
  EXPECT_EQ(error_of([] { ModelConfig::load("/nonexistent/config.json"); }),
            "/nonexistent/config.json: cannot open config.json");
  // A path beyond the system's name limit: a ksa::Error, not std::filesystem::filesystem_error.
  const std::string long_dir = "/tmp/" + std::string(300, 'd');
  EXPECT_EQ(error_of([&] { ModelConfig::load(long_dir); }), long_dir + "/config.json: cannot open config.json");
}

// Issue #26: hostile config.json files end in a ksa::Error naming the file, never a crash, a foreign
// exception or undefined behaviour.
std::string with_text(const std::string& from, const std::string& to) {
  std::string text = released().dump();
  const size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  return text.replace(at, from.size(), to);
}

TEST(ModelConfigHostile, DeepNestingIsRefusedAtParseTime) {
  // 200,000 '[': the error message's excerpt once dumped the value recursively and overflowed the stack.
  const std::string deep = std::string(200000, '[') + std::string(200000, ']');
  EXPECT_EQ(error_of([&] { ModelConfig::parse(deep, "cfg.json"); }),
            "cfg.json: invalid JSON: nested deeper than 100 levels (at byte 100)");
  const std::string inside = with_text("\"hidden_size\":2560", "\"hidden_size\":" + deep);
  EXPECT_NE(error_of([&] { ModelConfig::parse(inside, "cfg.json"); }).find("nested deeper than 100 levels"),
            std::string::npos);
  // 100 levels are fine (and are only a bad value here).
  const std::string ok =
      with_text("\"hidden_size\":2560", "\"hidden_size\":" + std::string(99, '[') + std::string(99, ']'));
  EXPECT_EQ(error_of([&] {
              ModelConfig::parse(ok, "cfg.json");
            }).rfind("cfg.json: hidden_size: must be an integer (got [[[[", 0),
            0u);
}

TEST(ModelConfigHostile, NumberBeyondDoubleIsAnError) {
  // 1e309 once escaped as nlohmann::json::out_of_range, past callers that catch ksa::Error.
  EXPECT_EQ(
      error_of([&] { ModelConfig::parse(with_text("\"rope_theta\":1000000", "\"rope_theta\":1e309"), "cfg.json"); }),
      "cfg.json: invalid JSON: number overflow parsing '1e309' (a number must fit in a double)");
  EXPECT_EQ(
      error_of([&] { ModelConfig::parse(with_text("\"rope_theta\":1000000", "\"rope_theta\":-1e400"), "cfg.json"); }),
      "cfg.json: invalid JSON: number overflow parsing '-1e400' (a number must fit in a double)");
}

TEST(ModelConfigHostile, ValuesNearInt64MaxAreBoundedBeforeArithmetic) {
  // summary_token_begin + summary_token_num overflowed (UB) and the config passed.
  EXPECT_EQ(error_with([](Json& j) { j["summary_token_begin"] = INT64_MAX; }),
            "cfg.json: summary_token_begin: must be a token id with room for S summary ids (got 9223372036854775807)");
  // Plain Qwen3 and KSA alike: the context feeds chunk arithmetic (k = context + 1) and the cache.
  for (bool ksa : {false, true}) {
    EXPECT_EQ(error_with([&](Json& j) {
                j["use_summary_attention"] = ksa;
                j["max_position_embeddings"] = INT64_MAX;
              }),
              "cfg.json: max_position_embeddings: must be in [1, 2^31-1] (got 9223372036854775807)");
    EXPECT_EQ(error_with([&](Json& j) {
                j["use_summary_attention"] = ksa;
                j["max_position_embeddings"] = (int64_t(1) << 31);
              }),
              "cfg.json: max_position_embeddings: must be in [1, 2^31-1] (got 2147483648)");
  }
  EXPECT_EQ(parse([] {
              Json j = released();
              j["max_position_embeddings"] = (int64_t(1) << 31) - 1;
              return j;
            }())
                .max_position_embeddings,
            (int64_t(1) << 31) - 1);
}

}  // namespace
}  // namespace ksa
