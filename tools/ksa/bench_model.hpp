// `ksa bench model` (cmd_bench_model.cpp), dispatched by `ksa bench` (cmd_bench.cpp) when the engine is built.
#pragma once

namespace ksa::tools {

// argv: the words after `ksa bench model`. Returns the exit code.
int run_bench_model(int argc, char** argv);

}  // namespace ksa::tools
