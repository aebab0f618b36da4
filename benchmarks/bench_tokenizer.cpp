// Encoding throughput of the byte-level BPE tokenizer on WikiText-2 test (1.3 MB), one thread.
// "cold" clears the word cache before every pass (first-encounter cost of every word);
// "warm" keeps it (steady state when a process encodes lots of similar text).
#include <benchmark/benchmark.h>

#include <filesystem>
#include <string>

#include "cacheshrink/io/file.hpp"
#include "cacheshrink/tokenizer/tokenizer.hpp"

namespace {

namespace fs = std::filesystem;
using cacheshrink::tokenizer::Tokenizer;
const fs::path kFixtures = CACHESHRINK_FIXTURES_DIR;

const std::string& wikitext() {
  static const std::string text = cacheshrink::io::read_text_file(kFixtures / "data/wikitext2_test.raw.txt");
  return text;
}

const Tokenizer& tokenizer(int which) {
  static const Tokenizer project = Tokenizer::from_file(kFixtures / "data/tokenizer.json");
  static const Tokenizer gpt2 =
      Tokenizer::from_gpt2_files(kFixtures / "tokenizers/gpt2/vocab.json", kFixtures / "tokenizers/gpt2/merges.txt");
  static const Tokenizer qwen3 = Tokenizer::from_file(kFixtures / "tokenizers/qwen3/tokenizer.json");
  return which == 0 ? project : which == 1 ? gpt2 : qwen3;
}

void run(benchmark::State& state, int which, bool cold) {
  const Tokenizer& tok = tokenizer(which);
  const std::string& text = wikitext();
  std::size_t ids = 0;
  for (auto _ : state) {
    if (cold) tok.clear_cache();
    auto out = tok.encode(text, false);
    ids = out.size();
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * text.size()));
  state.counters["ids"] = static_cast<double>(ids);
}

void BM_EncodeWikitext2Test_Project_Cold(benchmark::State& s) { run(s, 0, true); }
void BM_EncodeWikitext2Test_Project_Warm(benchmark::State& s) { run(s, 0, false); }
void BM_EncodeWikitext2Test_Gpt2_Cold(benchmark::State& s) { run(s, 1, true); }
void BM_EncodeWikitext2Test_Gpt2_Warm(benchmark::State& s) { run(s, 1, false); }
void BM_EncodeWikitext2Test_Qwen3_Cold(benchmark::State& s) { run(s, 2, true); }
void BM_EncodeWikitext2Test_Qwen3_Warm(benchmark::State& s) { run(s, 2, false); }

void BM_DecodeWikitext2Test_Project(benchmark::State& state) {
  const Tokenizer& tok = tokenizer(0);
  const auto ids = tok.encode(wikitext(), false);
  for (auto _ : state) {
    auto text = tok.decode(ids);
    benchmark::DoNotOptimize(text.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * wikitext().size()));
}

void BM_LoadQwen3TokenizerJson(benchmark::State& state) {
  for (auto _ : state) {
    auto t = Tokenizer::from_file(kFixtures / "tokenizers/qwen3/tokenizer.json");
    benchmark::DoNotOptimize(t.vocab_size());
  }
}

}  // namespace

BENCHMARK(BM_EncodeWikitext2Test_Project_Cold)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EncodeWikitext2Test_Project_Warm)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EncodeWikitext2Test_Gpt2_Cold)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EncodeWikitext2Test_Gpt2_Warm)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EncodeWikitext2Test_Qwen3_Cold)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EncodeWikitext2Test_Qwen3_Warm)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DecodeWikitext2Test_Project)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LoadQwen3TokenizerJson)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
