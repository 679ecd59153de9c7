// Per-layer patterns from config.json (docs/ksa.md: Parameters): an int, a list, or the Python-expression string form
// such as "([128]*3+[16768]*1)*9". Exactly this grammar is accepted; nothing is evaluated as code.
#pragma once
#include <cstdint>
#include <string_view>
#include <vector>

namespace ksa {

// Parses `expr` (the JSON value as text: "128", "[128, 16768]" or the string's content) into one value per
// layer. An int applies to every layer; a list must have num_layers entries. Values must be in
// [min_value, max_value]. Throws ksa::Error that names `field`, the offending character's offset and a
// caret under it. Grammar: expr := term ('+' term)*; term := atom ('*' int)*;
// atom := int | '[' [int (',' int)* [',']] ']' | '(' expr ')'. Python semantics: list+list concatenates,
// list*n repeats, int+int and int*int are arithmetic, list+int is an error.
std::vector<int64_t> parse_int_pattern(std::string_view expr, int64_t num_layers, const char* field, int64_t min_value,
                                       int64_t max_value);

// `summary_sliding_chunk_num`: windows W >= 0, one per layer.
std::vector<int64_t> parse_layer_pattern(std::string_view expr, int64_t num_layers);

}  // namespace ksa
