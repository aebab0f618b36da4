// Byte-level BPE tokenizer against HF tokenizers' ids (tokenizer_vectors.json, WikiText-2 ids),
// llama.cpp's tokenizer vectors, error handling, invalid input and a seeded fuzz round trip.
#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cacheshrink/io/file.hpp"
#include "cacheshrink/tokenizer/tokenizer.hpp"

namespace fs = std::filesystem;
using cacheshrink::tokenizer::Tokenizer;

namespace {

const fs::path kFixtures = CACHESHRINK_FIXTURES_DIR;

// Each tokenizer is parsed once per executable (Qwen3's tokenizer.json is 11 MB).
const Tokenizer& project_tokenizer() {
  static const Tokenizer t = Tokenizer::from_file(kFixtures / "data/tokenizer.json");
  return t;
}
const Tokenizer& gpt2_tokenizer() {
  static const Tokenizer t = Tokenizer::from_gpt2_files(kFixtures / "tokenizers/gpt2/vocab.json", kFixtures / "tokenizers/gpt2/merges.txt");
  return t;
}
const Tokenizer& qwen3_tokenizer() {
  static const Tokenizer t = Tokenizer::from_file(kFixtures / "tokenizers/qwen3/tokenizer.json");
  return t;
}

const nlohmann::json& vectors() {
  static const nlohmann::json j = nlohmann::json::parse(cacheshrink::io::read_text_file(kFixtures / "data/tokenizer_vectors.json"));
  return j;
}

std::string show(const std::vector<int>& ids) {
  std::string s;
  for (int id : ids) s += std::to_string(id) + " ";
  return s;
}

void check_vectors(const Tokenizer& tok, const char* key, bool allow_special = true) {
  const auto& strings = vectors()["strings"];
  const auto& expected = vectors()[key];
  REQUIRE(strings.size() == 353);
  REQUIRE(expected.size() == strings.size());
  int mismatches = 0;
  for (std::size_t i = 0; i < strings.size(); ++i) {
    const std::string text = strings[i].get<std::string>();
    const std::vector<int> want = expected[i].get<std::vector<int>>();
    const std::vector<int> got = tok.encode(text, allow_special);
    if (got != want && mismatches++ < 5) {
      INFO("string #", i, ": '", text.substr(0, 200), "'");
      INFO("want ", show(want));
      INFO("got  ", show(got));
      CHECK(got == want);
    }
    CHECK(tok.decode(got) == text);
  }
  CHECK(mismatches == 0);
}

// llama.cpp's test-tokenizer-0 files: strings each followed by "\n__ggml_vocab_test__\n";
// the .out file has one line of space-separated ids per string.
void check_llama_cpp(const Tokenizer& tok, const std::string& stem) {
  const std::string inp = cacheshrink::io::read_text_file(kFixtures / "tokenizers/llama.cpp-vectors" / (stem + ".inp"));
  const std::string outp = cacheshrink::io::read_text_file(kFixtures / "tokenizers/llama.cpp-vectors" / (stem + ".out"));
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (std::size_t pos = 0; pos < inp.size();) {
    const std::size_t e = inp.find(sep, pos);
    REQUIRE(e != std::string::npos);
    texts.push_back(inp.substr(pos, e - pos));
    pos = e + sep.size();
  }
  std::vector<std::vector<int>> want;
  std::istringstream lines(outp);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream ls(line);
    std::vector<int> ids;
    for (int id; ls >> id;) ids.push_back(id);
    want.push_back(ids);
  }
  REQUIRE(texts.size() == want.size());
  REQUIRE(texts.size() >= 40);
  for (std::size_t i = 0; i < texts.size(); ++i) {
    INFO(stem, " string #", i, ": '", texts[i], "'");
    const auto got = tok.encode(texts[i]);
    CHECK(show(got) == show(want[i]));
    CHECK(tok.decode(got) == texts[i]);
  }
}

}  // namespace

TEST_CASE("tokenizer: basic properties of the three vocabularies") {
  CHECK(project_tokenizer().vocab_size() == 4096);
  CHECK(gpt2_tokenizer().vocab_size() == 50257);
  CHECK(qwen3_tokenizer().vocab_size() > 151643);
  CHECK(gpt2_tokenizer().token_id("<|endoftext|>") == 50256);
  CHECK(gpt2_tokenizer().token_id("Ġthe") == 262);
  CHECK(gpt2_tokenizer().token_bytes(262) == " the");
  CHECK(qwen3_tokenizer().token_id("<|im_start|>") == 151644);
  CHECK(qwen3_tokenizer().normalizes_nfc());
  CHECK_FALSE(gpt2_tokenizer().normalizes_nfc());
  CHECK(gpt2_tokenizer().encode("Hello world") == std::vector<int>{15496, 995});
  CHECK(gpt2_tokenizer().encode("").empty());
  const Tokenizer from_dir = Tokenizer::from_directory(kFixtures / "models/tiny-qwen3");
  CHECK(from_dir.encode("Hello world") == project_tokenizer().encode("Hello world"));
  CHECK(cacheshrink::tokenizer::find_tokenizer_files(kFixtures / "tokenizers/gpt2").size() == 2);
}

TEST_CASE("tokenizer: tokenizer_vectors.json, project tokenizer") { check_vectors(project_tokenizer(), "project_tokenizer"); }
// The GPT-2 reference ids come from a bare HF Tokenizer(BPE(vocab, merges)) with no added
// tokens, so "<|endoftext|>" in string #352 is plain text there: allow_special = false.
TEST_CASE("tokenizer: tokenizer_vectors.json, GPT-2") { check_vectors(gpt2_tokenizer(), "gpt2", false); }
TEST_CASE("tokenizer: tokenizer_vectors.json, Qwen3") { check_vectors(qwen3_tokenizer(), "qwen3"); }

TEST_CASE("tokenizer: llama.cpp vectors") {
  check_llama_cpp(gpt2_tokenizer(), "ggml-vocab-gpt-2.gguf");
  check_llama_cpp(qwen3_tokenizer(), "ggml-vocab-qwen2.gguf");
}

TEST_CASE("tokenizer: WikiText-2 test and valid reproduce the reference ids") {
  for (const char* name : {"wikitext2_test.raw.txt", "wikitext2_valid.txt"}) {
    const std::string stem = std::string(name).substr(0, std::string(name).find('.'));
    const std::string text = cacheshrink::io::read_text_file(kFixtures / "data" / name);
    const std::vector<int> want = cacheshrink::io::read_ids_u16(kFixtures / "data" / (stem + ".ids.u16"));
    const std::vector<int> got = project_tokenizer().encode(text, /*allow_special=*/false);
    INFO(name);
    if (std::string(name) == "wikitext2_test.raw.txt") CHECK(want.size() == 430844);
    REQUIRE(got.size() == want.size());
    std::size_t first_diff = got.size();
    for (std::size_t i = 0; i < got.size(); ++i)
      if (got[i] != want[i]) {
        first_diff = i;
        break;
      }
    CHECK(first_diff == got.size());
    CHECK(project_tokenizer().decode(got) == text);
  }
}

TEST_CASE("tokenizer: special tokens") {
  const Tokenizer& q = qwen3_tokenizer();
  const std::string text = "<|im_start|>user\nhi<|im_end|>";
  const auto with = q.encode(text);
  REQUIRE(with.size() >= 4);
  CHECK(with.front() == 151644);
  CHECK(with.back() == 151645);
  CHECK(q.decode(with) == text);
  // With allow_special = false the markup is ordinary text.
  const auto without = q.encode(text, false);
  CHECK(std::find(without.begin(), without.end(), 151644) == without.end());
  CHECK(q.decode(without) == text);
  // Unknown special-looking text and pieces of special tokens are plain text.
  for (const std::string s : {"<|foo|>", "<|im_sta", "<|endoftext|", "|>", "<<|im_end|>>"}) {
    const auto ids = q.encode(s);
    CHECK(q.decode(ids) == s);
  }
  CHECK(q.encode("<<|im_end|>>").size() == 3);
  const Tokenizer& g = gpt2_tokenizer();
  CHECK(g.encode("a<|endoftext|>b") == std::vector<int>{64, 50256, 65});
  CHECK(g.encode("<|endoftext|>", false).size() > 1);
}

TEST_CASE("tokenizer: invalid UTF-8 is byte-level encoded and round-trips") {
  const std::vector<std::string> cases = {
      std::string("\xff"), std::string("abc\x80\x80 def"), std::string("\xc3"),          // truncated 2-byte
      std::string("\xe2\x82"),                                                           // truncated 3-byte
      std::string("\xed\xa0\x80"),                                                       // surrogate
      std::string("\xc0\xaf"),                                                           // overlong
      std::string("caf\xc3\xa9\xff\xfe Hello \xf4\x90\x80\x80!"), std::string("\x00\x01 x", 4)};
  for (const Tokenizer* t : {&project_tokenizer(), &gpt2_tokenizer(), &qwen3_tokenizer()}) {
    for (const auto& s : cases) {
      INFO("input bytes ", s.size());
      const auto ids = t->encode(s);
      CHECK(t->decode(ids) == s);
      for (int id : ids) CHECK((id >= 0 && id < t->vocab_size()));
    }
  }
  // Every lone byte is its own byte-level token.
  const Tokenizer& g = gpt2_tokenizer();
  const auto ids = g.encode(std::string("\xff"));
  REQUIRE(ids.size() == 1);
  CHECK(g.token_bytes(ids[0]) == "\xff");
}

TEST_CASE("tokenizer: Unicode whitespace follows Oniguruma (HF), not PCRE2's legacy \\s") {
  // Expected ids from HF tokenizers 0.23.3. U+180E is not White_Space since Unicode 6.3, but
  // PCRE2's \s still matches it; the pattern rewrite to \p{White_Space} makes us agree with HF.
  const std::string mvs = "\xe1\xa0\x8e's x\xe1\xa0\x8ey";
  CHECK(gpt2_tokenizer().encode(mvs) == std::vector<int>{157, 254, 236, 6, 82, 2124, 157, 254, 236, 88});
  CHECK(qwen3_tokenizer().encode(mvs) == std::vector<int>{123970, 236, 6, 82, 856, 123970, 236, 88});
  const std::string ws = "a\xe3\x80\x80\xe3\x80\x80" "b\xc2\x85 \xe2\x80\xa8" "c\xc2\xa0 d";
  CHECK(gpt2_tokenizer().encode(ws) == std::vector<int>{64, 5099, 222, 5099, 222, 65, 126, 227, 220, 447, 101, 66, 1849, 288});
  CHECK(qwen3_tokenizer().encode(ws) == std::vector<int>{64, 22441, 22441, 65, 126, 227, 220, 378, 101, 66, 4102, 294});
  CHECK(gpt2_tokenizer().encode("x\xe2\x80\x8b y") == std::vector<int>{87, 9525, 331});  // U+200B is not whitespace
  CHECK(cacheshrink::tokenizer::Regex::oniguruma_spaces(R"([^\s\p{L}]|\S|\\s|\Q\s\E)") ==
        R"([^\p{White_Space}\p{L}]|\P{White_Space}|\\s|\Q\s\E)");
}

TEST_CASE("tokenizer: NFC normalization (Qwen)") {
  using cacheshrink::tokenizer::nfc;
  CHECK(nfc("e\xcc\x81") == "\xc3\xa9");                           // e + U+0301 -> é
  CHECK(nfc("\xe1\x84\x80\xe1\x85\xa1") == "\xea\xb0\x80");         // Hangul L+V -> 가
  CHECK(nfc("\xe2\x84\xab") == "\xc3\x85");                         // Angstrom sign -> Å (singleton)
  CHECK(nfc("a\xcc\x95\xcc\x81") == "\xc3\xa1\xcc\x95");            // reorder: ccc 232 after 230, then compose
  CHECK(nfc("x\xff\xcc\x81") == "x\xff\xcc\x81");                   // nothing composes across an ill-formed byte
  CHECK(nfc("\xe1\x84\x80\xe1\x85\xa1\xe1\x86\xa8") == "\xea\xb0\x81");  // L+V+T -> 각
  CHECK(nfc("ab \xea\xb0\x80\xe1\x86\xa8 cd") == "ab \xea\xb0\x81 cd");   // LV syllable + T -> 각, text around kept
  CHECK(nfc("\xcc\x81" "a") == "\xcc\x81" "a");                        // a leading mark stays put
  const Tokenizer& q = qwen3_tokenizer();
  CHECK(q.encode("caf" "e\xcc\x81") == q.encode("caf\xc3\xa9"));
  CHECK(q.decode(q.encode("e\xcc\x81")) == "\xc3\xa9");
}

TEST_CASE("tokenizer: long words take the heap path and match the quadratic reference") {
  // Reference: repeatedly merge the leftmost lowest-rank pair (ranks from merges.txt),
  // rescanning from scratch, on words longer than the rescan path's limit.
  const Tokenizer& g = gpt2_tokenizer();
  std::map<std::pair<std::string, std::string>, int> rank;
  {
    std::istringstream lines(cacheshrink::io::read_text_file(kFixtures / "tokenizers/gpt2/merges.txt"));
    std::string line;
    std::getline(lines, line);  // #version
    for (int r = 0; std::getline(lines, line); ++r) {
      const auto sp = line.find(' ');
      if (sp != std::string::npos) rank.emplace(std::pair{line.substr(0, sp), line.substr(sp + 1)}, r);
    }
  }
  std::mt19937 rng(7);
  const std::string alphabet = "abcdeetnhsr";
  for (int trial = 0; trial < 40; ++trial) {
    std::string w;
    const int n = 49 + static_cast<int>(rng() % 300);
    for (int i = 0; i < n; ++i) w.push_back(alphabet[rng() % alphabet.size()]);
    const auto ids = g.encode(w);
    CHECK(g.decode(ids) == w);
    std::vector<std::string> sym;
    for (char c : w) sym.emplace_back(1, c);
    while (true) {
      int best = -1, best_rank = INT32_MAX;
      for (std::size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = rank.find({sym[i], sym[i + 1]});
        if (it != rank.end() && it->second < best_rank) best_rank = it->second, best = static_cast<int>(i);
      }
      if (best < 0) break;
      sym[best] += sym[best + 1];
      sym.erase(sym.begin() + best + 1);
    }
    std::vector<int> ref;
    for (const auto& s : sym) ref.push_back(*g.token_id(s));
    CHECK(show(ids) == show(ref));
  }
}

TEST_CASE("tokenizer: fuzz round trip with random bytes, UTF-8 and special-token pieces") {
  const std::vector<std::string> pieces = {
      "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|", "|>", "<|im_", "endoftext", " ", "  ", "\n", "\r\n", "\t",
      "the", " The", "'s", "'LL", "123", "3.14", "é", "e\xcc\x81", "中文", "😀", "\xf0\x9f", "\xe2\x80", "\xff", "\xc0",
      "\x80", "\xed\xa0\x80", "Ä", "ß", "\xc2\xa0", "\xe3\x80\x80", "!!", "...",
      "\xcc\x81", "\xcc\x95", "\xcc\xa3", "\xe1\x84\x80", "\xe1\x85\xa1", "\xe1\x86\xa8", "\xea\xb0\x80", "\xe2\x84\xab"};
  std::mt19937_64 rng(20240611);
  int checked = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::string s;
    const int parts = static_cast<int>(rng() % 24);
    for (int p = 0; p < parts; ++p) {
      switch (rng() % 4) {
        case 0: s += pieces[rng() % pieces.size()]; break;
        case 1: s.push_back(static_cast<char>(rng() & 0xFF)); break;  // any byte
        case 2: s.push_back(static_cast<char>(0x20 + rng() % 95)); break;
        default: {
          // a random valid code point
          char32_t cp = static_cast<char32_t>(rng() % 0x30000);
          if (cp >= 0xD800 && cp <= 0xDFFF) cp = 'x';
          cacheshrink::tokenizer::utf8_append(s, cp);
        }
      }
    }
    const bool valid = cacheshrink::tokenizer::is_valid_utf8(s);
    // Span-wise NFC must equal normalizing the whole string at once.
    std::string whole;
    cacheshrink::tokenizer::detail::nfc_append_full(s, whole);
    REQUIRE(cacheshrink::tokenizer::nfc(s) == whole);
    for (const Tokenizer* t : {&project_tokenizer(), &gpt2_tokenizer(), &qwen3_tokenizer()}) {
      for (bool allow : {true, false}) {
        const auto ids = t->encode(s, allow);
        for (int id : ids) REQUIRE((id >= 0 && id < t->vocab_size()));
        const std::string back = t->decode(ids);
        // Byte-level encoding keeps every byte, valid or not; Qwen additionally applies NFC.
        const std::string want = t->normalizes_nfc() ? cacheshrink::tokenizer::nfc(s) : s;
        if (back != want) {
          INFO("trial ", trial, " valid ", valid, " allow_special ", allow);
          CHECK(back == want);
        }
        ++checked;
      }
    }
  }
  CHECK(checked == 3000 * 6);
}

TEST_CASE("tokenizer: pathological long inputs") {
  for (const Tokenizer* t : {&gpt2_tokenizer(), &qwen3_tokenizer()}) {
    for (const std::string& s : {std::string(200000, ' '), std::string(100000, 'a'), std::string(50000, '\xff'),
                                 std::string(60000, '\n') + "x", std::string(100000, '1')}) {
      const auto ids = t->encode(s);
      CHECK(t->decode(ids) == s);
    }
  }
}

TEST_CASE("tokenizer: errors name the file and the problem") {
  using cacheshrink::FormatError;
  using cacheshrink::InvalidArgument;
  using cacheshrink::IoError;
  CHECK_THROWS_AS(Tokenizer::from_file(kFixtures / "no-such-tokenizer.json"), IoError);
  CHECK_THROWS_AS(Tokenizer::from_directory(kFixtures / "data/no-such-dir"), IoError);
  auto msg_of = [](const std::string& json) {
    try {
      (void)Tokenizer::from_json_string(json, "bad.json");
    } catch (const FormatError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string pre = R"("pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})";
  CHECK(msg_of("{not json").find("bad.json: not valid JSON") == 0);
  CHECK(msg_of(R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})").find("only byte-level BPE") != std::string::npos);
  CHECK(msg_of(R"({"model": {"type": "BPE"}, )" + pre + "}").find("model.vocab is missing") != std::string::npos);
  CHECK(msg_of(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a c"]}, )" + pre + "}")
            .find("refers to unknown token 'c'") != std::string::npos);
  CHECK(msg_of(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": [["a", "b"]]}, )" + pre + "}")
            .find("not in the vocabulary") != std::string::npos);
  CHECK(msg_of(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b c"]}, )" + pre + "}")
            .find("model.merges[0]") != std::string::npos);
  CHECK(msg_of(R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Whitespace"}})").find("\"Whitespace\" is not supported") !=
        std::string::npos);
  CHECK(msg_of(R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": null})").find("no ByteLevel step") != std::string::npos);
  CHECK(msg_of(R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(["}}})")
            .find("cannot compile regex") != std::string::npos);
  CHECK(msg_of(R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "normalizer": {"type": "Lowercase"}, )" + pre + "}").find("Lowercase") !=
        std::string::npos);
  // A tiny valid file: merges in both spellings, an added token, decode errors.
  const Tokenizer tiny = Tokenizer::from_json_string(
      R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "c": 3, "abc": 4}, "merges": ["a b", ["ab", "c"]]},
          "added_tokens": [{"id": 5, "content": "<s>", "special": true}], )" + pre + "}");
  CHECK(tiny.vocab_size() == 6);
  CHECK(tiny.encode("abcab<s>a") == std::vector<int>{4, 2, 5, 0});
  CHECK(tiny.encode("xyz").empty());  // bytes missing from the vocabulary and no unk_token: dropped, as in HF
  CHECK_THROWS_AS(tiny.decode(std::vector<int>{6}), InvalidArgument);
  CHECK_THROWS_AS(tiny.decode(std::vector<int>{-1}), InvalidArgument);
  CHECK(tiny.decode(std::vector<int>{4, 5}) == "abc<s>");
}

TEST_CASE("tokenizer: Split behaviours, prefix space, single_word/lstrip/rstrip (ids from HF tokenizers 0.23.3)") {
  const std::string vocab =
      R"("vocab": {"a": 0, "b": 1, "Ġ": 2, "-": 3, "Ġa": 4, "<m>": 5, "<": 6, "m": 7, ">": 8, "a-": 9, "-a": 10, "--": 11,
                   "Ġ-": 12, "a--": 13}, "merges": ["Ġ a", "a -", "- a", "- -", "Ġ -", "a --"])";
  auto make = [&](const std::string& pre, const std::string& added = "[]") {
    return Tokenizer::from_json_string(R"({"model": {"type": "BPE", )" + vocab + R"(}, "pre_tokenizer": )" + pre +
                                       R"(, "added_tokens": )" + added + "}");
  };
  const std::string bl = R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": false})";
  auto split = [&](const std::string& behavior, bool invert) {
    return make(R"({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "-+"}, "behavior": ")" + behavior +
                R"(", "invert": )" + (invert ? "true" : "false") + "}, " + bl + "]}");
  };
  CHECK(split("Isolated", false).encode(" a--a- ") == std::vector<int>{4, 11, 0, 3, 2});
  CHECK(split("Isolated", false).encode("---a") == std::vector<int>{11, 3, 0});
  CHECK(split("Isolated", false).encode("a-a-a") == std::vector<int>{0, 3, 0, 3, 0});
  CHECK(split("Isolated", false).encode("-- a-") == std::vector<int>{11, 4, 3});
  CHECK(split("Isolated", true).encode(" a--a- ") == std::vector<int>{4, 11, 0, 3, 2});
  CHECK(split("Isolated", true).encode("---a") == std::vector<int>{11, 3, 0});
  CHECK(split("Isolated", true).encode("a-a-a") == std::vector<int>{0, 3, 0, 3, 0});
  CHECK(split("Isolated", true).encode("-- a-") == std::vector<int>{11, 4, 3});
  CHECK(split("Removed", false).encode(" a--a- ") == std::vector<int>{4, 0, 2});
  CHECK(split("Removed", false).encode("---a") == std::vector<int>{0});
  CHECK(split("Removed", false).encode("a-a-a") == std::vector<int>{0, 0, 0});
  CHECK(split("Removed", false).encode("-- a-") == std::vector<int>{4});
  CHECK(split("Removed", true).encode(" a--a- ") == std::vector<int>{11, 3});
  CHECK(split("Removed", true).encode("---a") == std::vector<int>{11, 3});
  CHECK(split("Removed", true).encode("a-a-a") == std::vector<int>{3, 3});
  CHECK(split("Removed", true).encode("-- a-") == std::vector<int>{11, 3});
  CHECK(split("MergedWithPrevious", false).encode(" a--a- ") == std::vector<int>{4, 11, 9, 2});
  CHECK(split("MergedWithPrevious", false).encode("---a") == std::vector<int>{11, 3, 0});
  CHECK(split("MergedWithPrevious", false).encode("a-a-a") == std::vector<int>{9, 9, 0});
  CHECK(split("MergedWithPrevious", false).encode("-- a-") == std::vector<int>{11, 4, 3});
  CHECK(split("MergedWithPrevious", true).encode(" a--a- ") == std::vector<int>{4, 3, 10, 3, 2});
  CHECK(split("MergedWithPrevious", true).encode("---a") == std::vector<int>{11, 10});
  CHECK(split("MergedWithPrevious", true).encode("a-a-a") == std::vector<int>{0, 10, 10});
  CHECK(split("MergedWithPrevious", true).encode("-- a-") == std::vector<int>{11, 4, 3});
  CHECK(split("MergedWithNext", false).encode(" a--a- ") == std::vector<int>{4, 3, 10, 3, 2});
  CHECK(split("MergedWithNext", false).encode("---a") == std::vector<int>{11, 10});
  CHECK(split("MergedWithNext", false).encode("a-a-a") == std::vector<int>{0, 10, 10});
  CHECK(split("MergedWithNext", false).encode("-- a-") == std::vector<int>{11, 4, 3});
  CHECK(split("MergedWithNext", true).encode(" a--a- ") == std::vector<int>{4, 11, 9, 2});
  CHECK(split("MergedWithNext", true).encode("---a") == std::vector<int>{11, 3, 0});
  CHECK(split("MergedWithNext", true).encode("a-a-a") == std::vector<int>{9, 9, 0});
  CHECK(split("MergedWithNext", true).encode("-- a-") == std::vector<int>{11, 4, 3});
  CHECK(split("Contiguous", false).encode(" a--a- ") == std::vector<int>{4, 11, 0, 3, 2});
  CHECK(split("Contiguous", false).encode("---a") == std::vector<int>{11, 3, 0});
  CHECK(split("Contiguous", false).encode("a-a-a") == std::vector<int>{0, 3, 0, 3, 0});
  CHECK(split("Contiguous", false).encode("-- a-") == std::vector<int>{11, 4, 3});
  CHECK(split("Contiguous", true).encode(" a--a- ") == std::vector<int>{4, 11, 0, 3, 2});
  CHECK(split("Contiguous", true).encode("---a") == std::vector<int>{11, 3, 0});
  CHECK(split("Contiguous", true).encode("a-a-a") == std::vector<int>{0, 3, 0, 3, 0});
  CHECK(split("Contiguous", true).encode("-- a-") == std::vector<int>{11, 4, 3});
  const std::string prefix_bl = R"({"type": "ByteLevel", "add_prefix_space": true, "use_regex": true})";
  const Tokenizer prefix = make(prefix_bl);
  CHECK(prefix.encode("a") == std::vector<int>{4});
  CHECK(prefix.encode(" a") == std::vector<int>{4});
  auto added = [&](const std::string& flags) {
    return make(prefix_bl, R"([{"id": 5, "content": "<m>", "special": false, )" + flags + "}]");
  };
  // The prefix space goes in front of every stretch between added tokens, as in HF.
  CHECK(added(R"("lstrip": false)").encode("a<m>a") == std::vector<int>{4, 5, 4});
  CHECK(added(R"("single_word": true)").encode("a<m>-a") == std::vector<int>{4, 6, 7, 8, 3, 0});  // touches a word: plain text
  CHECK(added(R"("single_word": true)").encode("-<m> a") == std::vector<int>{12, 5, 4});
  CHECK(added(R"("single_word": true)").encode(" <m>-") == std::vector<int>{2, 5, 12});
  CHECK(added(R"("lstrip": true)").encode("a<m>-a") == std::vector<int>{4, 5, 12, 0});
  CHECK(added(R"("lstrip": true)").encode(" <m>-") == std::vector<int>{5, 12});
  CHECK(added(R"("rstrip": true)").encode(" <m>-") == std::vector<int>{2, 5, 12});
  const Tokenizer strip = make(bl, R"([{"id": 5, "content": "<m>", "lstrip": true, "rstrip": true, "special": true}])");
  CHECK(strip.encode("a  <m>  b") == std::vector<int>{0, 5, 1});
  CHECK(strip.encode("a  <m>  b", false).size() == 9);  // special tokens off: plain text
}

TEST_CASE("tokenizer: ignore_merges, unk_token and fuse_unk (ids from HF tokenizers 0.23.3)") {
  auto make = [](bool ignore_merges, const std::string& unk, bool fuse) {
    return Tokenizer::from_json_string(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "<unk>": 5},
        "merges": ["a b"], "ignore_merges": )" + std::string(ignore_merges ? "true" : "false") + R"(, "unk_token": )" + unk +
                                       R"(, "fuse_unk": )" + (fuse ? "true" : "false") +
                                       R"(}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}})");
  };
  CHECK(make(true, "null", false).encode("abc abcab") == std::vector<int>{4, 3, 2, 3});
  CHECK(make(false, "null", false).encode("abc abcab") == std::vector<int>{3, 2, 3, 2, 3});
  CHECK(make(false, R"("<unk>")", false).encode("axxb") == std::vector<int>{0, 5, 5, 1});
  CHECK(make(false, R"("<unk>")", true).encode("axxbx") == std::vector<int>{0, 5, 1, 5});
  CHECK(make(false, "null", false).encode("axxb") == std::vector<int>{3});  // unknown bytes vanish, then a+b merge
}

TEST_CASE("tokenizer: concurrent encode shares the word cache safely") {
  const Tokenizer& tok = project_tokenizer();
  const std::string text = cacheshrink::io::read_text_file(kFixtures / "data/wikitext2_valid.txt").substr(0, 200000);
  tok.clear_cache();
  const auto want = tok.encode(text, false);
  tok.clear_cache();
  std::vector<std::vector<int>> got(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&, t] { got[t] = tok.encode(text, false); });
  for (auto& th : threads) th.join();
  for (const auto& g : got) CHECK(g == want);
  CHECK(tok.cache_size() > 0);
  CHECK(tok.cache_size() <= cacheshrink::tokenizer::detail::WordCache::kMaxEntries);
}
