#pragma once
// Byte-level BPE tokenizer (GPT-2, Qwen2/Qwen3, LLaMA-3 and look-alikes) read from a
// HuggingFace tokenizer.json or from GPT-2's vocab.json + merges.txt. Produces the same ids as
// HF tokenizers' `encode(text, add_special_tokens=False)`.
//
// Pipeline of encode():
//   1. added tokens (tokenizer.json "added_tokens") are found first, leftmost-longest, on the
//      raw text, honouring single_word / lstrip / rstrip; with allow_special == false only
//      added tokens whose "special" flag is false are recognized, and special-token text is
//      encoded like any other text;
//   2. each stretch of text between added tokens is normalized (NFC when the file asks for it),
//   3. split by the pre-tokenizer (ByteLevel's GPT-2 regex, or Split regexes in a Sequence,
//      run by PCRE2 with Unicode properties),
//   4. each piece is mapped byte by byte to the byte-level alphabet and merged by rank; results
//      for short pieces are kept in a bounded cache shared by copies of the Tokenizer.
//
// Input that is not valid UTF-8 (defined behaviour, never an error):
//   - ill-formed bytes are not matched by any regex class; each maximal run of text the
//     regex does not match (including such bytes) becomes its own pre-token, as HF's Split
//     does with gaps between matches; NFC copies them through unchanged;
//   - every byte, valid or not, is then byte-level encoded, so decode(encode(s)) == s holds
//     for any byte string when the tokenizer has no normalizer (GPT-2, LLaMA-3, the project
//     tokenizer) and decode(encode(s)) == nfc(s) when it normalizes with NFC (Qwen).
//   HF tokenizers itself only accepts valid UTF-8 (Rust &str / Python str), so on valid
//   input the two agree and on invalid input there is nothing to disagree with.
// Unknown special tokens: text such as "<|foo|>" that is not an added token is ordinary text
// and is BPE-encoded byte by byte; there is no "unknown token" id for byte-level BPE.
// decode() of an id outside [0, vocab_size()) or not assigned to any token throws
// cacheshrink::InvalidArgument.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/tokenizer/bpe.hpp"
#include "cacheshrink/tokenizer/byte_level.hpp"
#include "cacheshrink/tokenizer/regex.hpp"
#include "cacheshrink/tokenizer/unicode.hpp"

namespace cacheshrink::tokenizer {

/// GPT-2's pre-tokenizer pattern (HF ByteLevel with use_regex = true).
inline constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

/// An entry of tokenizer.json "added_tokens" (flags as in HF tokenizers).
struct AddedToken {
  int id = 0;
  std::string content;
  bool special = false;      // recognized by encode() only when allow_special is true
  bool single_word = false;  // only when not touching a word character on either side
  bool lstrip = false;       // absorbs whitespace on its left
  bool rstrip = false;       // absorbs whitespace on its right
  bool normalized = false;   // HF matches these after normalization; we match on raw text
};

/// HF SplitDelimiterBehavior: what happens to the regex matches of a Split step.
enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

namespace detail {

struct TransparentHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};
using StringIdMap = std::unordered_map<std::string, int, TransparentHash, std::equal_to<>>;

// One step of the pre-tokenizer: a regex split (Split, or ByteLevel with use_regex) and/or a
// prefix space (ByteLevel with add_prefix_space).
struct PreTokenizerStep {
  std::shared_ptr<const Regex> regex;  // null: no splitting
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  bool add_prefix_space = false;
};

// Byte trie over added-token contents, for leftmost-longest matching.
struct AddedTrie {
  struct Node {
    std::vector<std::pair<unsigned char, int>> children;  // sorted by byte
    int token = -1;                                       // index into added tokens
  };
  std::vector<Node> nodes{Node{}};
  std::array<bool, 256> first_byte{};

  void insert(std::string_view s, int token) {
    int cur = 0;
    for (char ch : s) {
      const auto b = static_cast<unsigned char>(ch);
      auto& kids = nodes[cur].children;
      auto it = std::lower_bound(kids.begin(), kids.end(), b, [](const auto& p, unsigned char x) { return p.first < x; });
      if (it != kids.end() && it->first == b) {
        cur = it->second;
      } else {
        const int idx = static_cast<int>(nodes.size());
        kids.insert(it, {b, idx});  // may reallocate kids; nodes grows below
        nodes.push_back(Node{});
        cur = idx;
      }
    }
    if (nodes[cur].token < 0) nodes[cur].token = token;  // first definition wins on duplicates
    if (!s.empty()) first_byte[static_cast<unsigned char>(s[0])] = true;
  }
  int child(int node, unsigned char b) const {
    const auto& kids = nodes[node].children;
    auto it = std::lower_bound(kids.begin(), kids.end(), b, [](const auto& p, unsigned char x) { return p.first < x; });
    return (it != kids.end() && it->first == b) ? it->second : -1;
  }
};

// Everything that is immutable after loading; shared between copies of a Tokenizer.
struct TokenizerModel {
  std::string source;                   // file name(s), for messages
  std::vector<std::string> id_bytes;    // raw bytes each id decodes to
  std::vector<char> id_assigned;        // 0 for ids nobody defines (holes in the id space)
  StringIdMap text_to_id;               // vocabulary strings and added-token contents
  StringIdMap bytes_to_id;              // raw bytes -> id; only filled when ignore_merges
  std::array<int, 256> byte_id{};      // id of each single-byte symbol, -1 if absent
  PairMap merges;
  bool ignore_merges = false;
  std::optional<int> unk_id;
  bool fuse_unk = false;
  bool nfc = false;
  std::vector<PreTokenizerStep> steps;
  std::vector<AddedToken> added;
  AddedTrie trie;
  bool has_non_special_added = false;
};

// Bounded cache of word -> ids. Filling it past capacity clears it: simple, and the working
// set of natural text refills within a few kilobytes.
struct WordCache {
  static constexpr std::size_t kMaxEntries = 1 << 17;
  static constexpr std::size_t kMaxWordBytes = 64;
  mutable std::shared_mutex mutex;
  std::unordered_map<std::string, std::vector<int>, TransparentHash, std::equal_to<>> map;
};

inline bool is_word_byte(unsigned char b) {
  // HF checks char::is_alphanumeric || '_'; bytes of multi-byte characters count as word
  // characters here, which is right for letters and digits of every script.
  return (b >= '0' && b <= '9') || (b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') || b == '_' || b >= 0x80;
}
inline bool is_space_byte(unsigned char b) { return b == ' ' || b == '\t' || b == '\n' || b == '\r' || b == '\v' || b == '\f'; }

}  // namespace detail

class Tokenizer {
 public:
  /// Reads a HF tokenizer.json whose model is byte-level BPE.
  /// Throws IoError (unreadable) or FormatError (malformed or unsupported; the message names
  /// the file and the offending field).
  static Tokenizer from_file(const std::filesystem::path& tokenizer_json) {
    return from_json_string(read_file(tokenizer_json), tokenizer_json.string());
  }

  /// Same as from_file on the text of a tokenizer.json; `source` names it in error messages.
  static Tokenizer from_json_string(std::string_view json_text, const std::string& source = "<tokenizer.json>") {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(json_text.begin(), json_text.end());
    } catch (const nlohmann::json::exception& e) {
      throw FormatError(source + ": not valid JSON (" + e.what() + ")");
    }
    try {
      return from_json(j, source);
    } catch (const nlohmann::json::exception& e) {
      throw FormatError(source + ": unexpected JSON structure (" + e.what() + ")");
    }
  }

  /// Reads GPT-2's vocab.json + merges.txt (pre-tokenizer: ByteLevel with the GPT-2 regex;
  /// "<|endoftext|>", when in the vocabulary, is a special added token).
  static Tokenizer from_gpt2_files(const std::filesystem::path& vocab_json, const std::filesystem::path& merges_txt) {
    const std::string source = vocab_json.string() + " + " + merges_txt.string();
    nlohmann::json vocab;
    try {
      const std::string text = read_file(vocab_json);
      vocab = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw FormatError(vocab_json.string() + ": not valid JSON (" + e.what() + ")");
    }
    if (!vocab.is_object()) throw FormatError(vocab_json.string() + ": expected a JSON object token -> id");
    const std::string merges_text = read_file(merges_txt);
    auto m = std::make_shared<detail::TokenizerModel>();
    m->source = source;
    load_vocab(*m, vocab, vocab_json.string());
    std::size_t line_no = 0, pos = 0, rank = 0;
    m->merges.reserve(merges_text.size() / 8);
    while (pos < merges_text.size()) {
      std::size_t end = merges_text.find('\n', pos);
      if (end == std::string::npos) end = merges_text.size();
      std::string_view line(merges_text.data() + pos, end - pos);
      pos = end + 1;
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.empty() || (line_no == 1 && line.starts_with("#version"))) continue;
      const std::string where = merges_txt.string() + ":" + std::to_string(line_no);
      const std::size_t sp = line.find(' ');
      if (sp == std::string_view::npos || line.find(' ', sp + 1) != std::string_view::npos)
        throw FormatError(where + ": expected two tokens separated by one space, got '" + std::string(line) + "'");
      add_merge(*m, line.substr(0, sp), line.substr(sp + 1), static_cast<int>(rank++), where);
    }
    m->steps.push_back({std::make_shared<const Regex>(kGpt2Pattern, false, "GPT-2 pattern"), SplitBehavior::Isolated, false, false});
    if (auto it = m->text_to_id.find(std::string_view("<|endoftext|>")); it != m->text_to_id.end()) {
      AddedToken eot;
      eot.id = it->second;
      eot.content = "<|endoftext|>";
      eot.special = true;
      m->added.push_back(eot);
    }
    finish(*m);
    return Tokenizer(std::move(m));
  }

  /// Loads the tokenizer of a model directory (see find_tokenizer_files).
  static Tokenizer from_directory(const std::filesystem::path& model_dir);

  /// Token ids of `text` (no BOS/EOS is added; HF's add_special_tokens=False).
  std::vector<int> encode(std::string_view text, bool allow_special = true) const {
    std::vector<int> ids;
    ids.reserve(text.size() / 3 + 1);
    encode_into(text, ids, allow_special);
    return ids;
  }

  /// Appends the ids of `text` to `out`.
  void encode_into(std::string_view text, std::vector<int>& out, bool allow_special = true) const {
    const detail::TokenizerModel& m = *model_;
    Scratch scratch(m);
    const bool scan_added = !m.added.empty() && (allow_special || m.has_non_special_added);
    if (!scan_added) {
      encode_segment(text, out, scratch);
      return;
    }
    std::size_t seg_begin = 0;
    std::size_t i = 0;
    while (i < text.size()) {
      if (!m.trie.first_byte[static_cast<unsigned char>(text[i])]) {
        ++i;
        continue;
      }
      // Longest allowed added token starting at i.
      int best = -1;
      std::size_t best_end = 0;
      for (std::size_t k = i, node = 0; k < text.size();) {
        const int c = m.trie.child(static_cast<int>(node), static_cast<unsigned char>(text[k]));
        if (c < 0) break;
        node = static_cast<std::size_t>(c);
        ++k;
        const int t = m.trie.nodes[node].token;
        if (t >= 0 && (allow_special || !m.added[t].special)) best = t, best_end = k;
      }
      if (best < 0) {
        ++i;
        continue;
      }
      const AddedToken& tok = m.added[best];
      if (tok.single_word) {
        const bool left_ok = i == 0 || !detail::is_word_byte(static_cast<unsigned char>(text[i - 1]));
        const bool right_ok = best_end == text.size() || !detail::is_word_byte(static_cast<unsigned char>(text[best_end]));
        if (!left_ok || !right_ok) {
          i = best_end;  // HF drops the match and continues after it
          continue;
        }
      }
      std::size_t start = i, stop = best_end;
      if (tok.lstrip)
        while (start > seg_begin && detail::is_space_byte(static_cast<unsigned char>(text[start - 1]))) --start;
      if (tok.rstrip)
        while (stop < text.size() && detail::is_space_byte(static_cast<unsigned char>(text[stop]))) ++stop;
      encode_segment(text.substr(seg_begin, start - seg_begin), out, scratch);
      out.push_back(tok.id);
      seg_begin = i = stop;
    }
    encode_segment(text.substr(seg_begin), out, scratch);
  }

  /// The bytes `ids` stand for, concatenated. Added tokens decode to their content.
  /// Throws InvalidArgument for an id that is not a token.
  std::string decode(std::span<const int> ids) const {
    const detail::TokenizerModel& m = *model_;
    std::size_t total = 0;
    for (int id : ids) {
      check_id(id);
      total += m.id_bytes[static_cast<std::size_t>(id)].size();
    }
    std::string out;
    out.reserve(total);
    for (int id : ids) out += m.id_bytes[static_cast<std::size_t>(id)];
    return out;
  }

  /// One past the largest id (model vocabulary and added tokens together).
  int vocab_size() const { return static_cast<int>(model_->id_bytes.size()); }

  /// Id of a token given as written in the vocabulary (byte-level alphabet, e.g. "Ġthe") or
  /// an added token's content (e.g. "<|endoftext|>").
  std::optional<int> token_id(std::string_view token) const {
    auto it = model_->text_to_id.find(token);
    if (it == model_->text_to_id.end()) return std::nullopt;
    return it->second;
  }

  /// Raw bytes of one token (what decode() emits for it). Throws InvalidArgument if not a token.
  std::string_view token_bytes(int id) const {
    check_id(id);
    return model_->id_bytes[static_cast<std::size_t>(id)];
  }

  const std::vector<AddedToken>& added_tokens() const { return model_->added; }

  /// True when encode() applies NFC (decode(encode(s)) then equals nfc(s), not s).
  bool normalizes_nfc() const { return model_->nfc; }

  /// Number of cached words (for tests and tuning); clear_cache() empties the cache.
  std::size_t cache_size() const {
    std::shared_lock lock(cache_->mutex);
    return cache_->map.size();
  }
  void clear_cache() const {
    std::unique_lock lock(cache_->mutex);
    cache_->map.clear();
  }

 private:
  explicit Tokenizer(std::shared_ptr<const detail::TokenizerModel> m)
      : model_(std::move(m)), cache_(std::make_shared<detail::WordCache>()) {}

  static std::string read_file(const std::filesystem::path& path) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) throw IoError(path.string() + ": no such file (or not a regular file)");
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) throw IoError(path.string() + ": cannot open for reading");
    std::string s;
    char buf[1 << 16];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
    const bool bad = std::ferror(f) != 0;
    std::fclose(f);
    if (bad) throw IoError(path.string() + ": read error");
    return s;
  }

  void check_id(int id) const {
    if (id < 0 || id >= vocab_size() || !model_->id_assigned[static_cast<std::size_t>(id)])
      throw InvalidArgument("decode: id " + std::to_string(id) + " is not a token of " + model_->source + " (vocab_size " +
                            std::to_string(vocab_size()) + ")");
  }

  static void set_token(detail::TokenizerModel& m, int id, std::string text, std::string bytes) {
    if (static_cast<std::size_t>(id) >= m.id_bytes.size()) {
      m.id_bytes.resize(static_cast<std::size_t>(id) + 1);
      m.id_assigned.resize(static_cast<std::size_t>(id) + 1, 0);
    }
    m.id_bytes[static_cast<std::size_t>(id)] = std::move(bytes);
    m.id_assigned[static_cast<std::size_t>(id)] = 1;
    m.text_to_id.insert_or_assign(std::move(text), id);
  }

  static void load_vocab(detail::TokenizerModel& m, const nlohmann::json& vocab, const std::string& where) {
    const auto& alphabet = ByteLevelAlphabet::get();
    m.text_to_id.reserve(vocab.size());
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      if (!it.value().is_number_integer())
        throw FormatError(where + ": vocab entry '" + it.key() + "' has a non-integer id");
      const auto id = it.value().get<std::int64_t>();
      if (id < 0 || id > (1 << 28)) throw FormatError(where + ": vocab entry '" + it.key() + "' has id " + std::to_string(id) + " out of range");
      // Tokens outside the byte-level alphabet decode to their own UTF-8, as HF's ByteLevel decoder does.
      std::optional<std::string> bytes = alphabet.to_bytes(it.key());
      set_token(m, static_cast<int>(id), it.key(), bytes ? std::move(*bytes) : it.key());
    }
    if (m.id_bytes.empty()) throw FormatError(where + ": vocabulary is empty");
  }

  static void add_merge(detail::TokenizerModel& m, std::string_view a, std::string_view b, int rank, const std::string& where) {
    auto ia = m.text_to_id.find(a);
    if (ia == m.text_to_id.end()) throw FormatError(where + ": merge '" + std::string(a) + " " + std::string(b) + "' refers to unknown token '" + std::string(a) + "'");
    auto ib = m.text_to_id.find(b);
    if (ib == m.text_to_id.end()) throw FormatError(where + ": merge '" + std::string(a) + " " + std::string(b) + "' refers to unknown token '" + std::string(b) + "'");
    std::string joined;
    joined.reserve(a.size() + b.size());
    joined.append(a).append(b);
    auto ij = m.text_to_id.find(std::string_view(joined));
    if (ij == m.text_to_id.end()) throw FormatError(where + ": merge '" + std::string(a) + " " + std::string(b) + "' produces '" + joined + "', which is not in the vocabulary");
    m.merges.insert(ia->second, ib->second, {rank, ij->second});
  }

  static Tokenizer from_json(const nlohmann::json& j, const std::string& source) {
    if (!j.is_object()) throw FormatError(source + ": expected a JSON object at top level");
    auto m = std::make_shared<detail::TokenizerModel>();
    m->source = source;
    auto model_it = j.find("model");
    if (model_it == j.end() || !model_it->is_object()) throw FormatError(source + ": missing \"model\" object");
    const nlohmann::json& model = *model_it;
    const std::string type = model.contains("type") && model["type"].is_string() ? model["type"].get<std::string>() : std::string("BPE");
    if (type != "BPE") throw FormatError(source + ": model.type is \"" + type + "\"; only byte-level BPE is supported");
    auto vocab_it = model.find("vocab");
    if (vocab_it == model.end() || !vocab_it->is_object()) throw FormatError(source + ": model.vocab is missing or not an object");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      auto it = model.find(key);
      if (it != model.end() && it->is_string() && !it->get<std::string>().empty())
        throw FormatError(source + ": model." + key + " = \"" + it->get<std::string>() + "\" is not supported (byte-level BPE only)");
    }
    load_vocab(*m, *vocab_it, source + ": model.vocab");
    if (auto it = model.find("ignore_merges"); it != model.end() && it->is_boolean()) m->ignore_merges = it->get<bool>();
    if (auto it = model.find("fuse_unk"); it != model.end() && it->is_boolean()) m->fuse_unk = it->get<bool>();
    if (auto it = model.find("unk_token"); it != model.end() && it->is_string()) {
      auto u = m->text_to_id.find(it->get_ref<const std::string&>());
      if (u == m->text_to_id.end()) throw FormatError(source + ": model.unk_token \"" + it->get<std::string>() + "\" is not in the vocabulary");
      m->unk_id = u->second;
    }
    if (auto it = model.find("merges"); it != model.end() && !it->is_null()) {
      if (!it->is_array()) throw FormatError(source + ": model.merges is not an array");
      m->merges.reserve(it->size());
      int rank = 0;
      for (const auto& e : *it) {
        const std::string where = source + ": model.merges[" + std::to_string(rank) + "]";
        if (e.is_string()) {
          const auto& s = e.get_ref<const std::string&>();
          const std::size_t sp = s.find(' ');
          if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
            throw FormatError(where + ": expected \"a b\", got \"" + s + "\"");
          add_merge(*m, std::string_view(s).substr(0, sp), std::string_view(s).substr(sp + 1), rank, where);
        } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
          add_merge(*m, e[0].get_ref<const std::string&>(), e[1].get_ref<const std::string&>(), rank, where);
        } else {
          throw FormatError(where + ": expected \"a b\" or [\"a\", \"b\"], got " + e.dump());
        }
        ++rank;
      }
    }
    load_normalizer(*m, j.contains("normalizer") ? j["normalizer"] : nlohmann::json(), source + ": normalizer");
    bool byte_level = false;
    load_pre_tokenizer(*m, j.contains("pre_tokenizer") ? j["pre_tokenizer"] : nlohmann::json(), source + ": pre_tokenizer", byte_level);
    if (!byte_level) throw FormatError(source + ": pre_tokenizer has no ByteLevel step; only byte-level BPE is supported");
    if (auto it = j.find("decoder"); it != j.end() && !it->is_null()) {
      const std::string dtype = it->value("type", std::string());
      if (dtype != "ByteLevel") throw FormatError(source + ": decoder.type is \"" + dtype + "\"; expected ByteLevel");
    }
    if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) {
      if (!it->is_array()) throw FormatError(source + ": added_tokens is not an array");
      for (std::size_t k = 0; k < it->size(); ++k) {
        const auto& e = (*it)[k];
        const std::string where = source + ": added_tokens[" + std::to_string(k) + "]";
        if (!e.is_object() || !e.contains("id") || !e["id"].is_number_integer() || !e.contains("content") || !e["content"].is_string())
          throw FormatError(where + ": expected an object with integer \"id\" and string \"content\"");
        AddedToken t;
        const auto id = e["id"].get<std::int64_t>();
        if (id < 0 || id > (1 << 28)) throw FormatError(where + ": id " + std::to_string(id) + " out of range");
        t.id = static_cast<int>(id);
        t.content = e["content"].get<std::string>();
        if (t.content.empty()) throw FormatError(where + ": empty content");
        t.special = e.value("special", false);
        t.single_word = e.value("single_word", false);
        t.lstrip = e.value("lstrip", false);
        t.rstrip = e.value("rstrip", false);
        t.normalized = e.value("normalized", !t.special);
        m->added.push_back(std::move(t));
      }
    }
    finish(*m);
    return Tokenizer(std::move(m));
  }

  static void load_normalizer(detail::TokenizerModel& m, const nlohmann::json& n, const std::string& where) {
    if (n.is_null()) return;
    const std::string type = n.value("type", std::string());
    if (type == "NFC") {
      m.nfc = true;
    } else if (type == "Sequence") {
      if (!n.contains("normalizers") || !n["normalizers"].is_array()) throw FormatError(where + ": Sequence without \"normalizers\" array");
      for (std::size_t k = 0; k < n["normalizers"].size(); ++k)
        load_normalizer(m, n["normalizers"][k], where + ".normalizers[" + std::to_string(k) + "]");
    } else {
      throw FormatError(where + ": normalizer type \"" + type + "\" is not supported (supported: NFC, Sequence)");
    }
  }

  static void load_pre_tokenizer(detail::TokenizerModel& m, const nlohmann::json& p, const std::string& where, bool& byte_level) {
    if (p.is_null()) return;
    const std::string type = p.value("type", std::string());
    if (type == "Sequence") {
      if (!p.contains("pretokenizers") || !p["pretokenizers"].is_array()) throw FormatError(where + ": Sequence without \"pretokenizers\" array");
      for (std::size_t k = 0; k < p["pretokenizers"].size(); ++k)
        load_pre_tokenizer(m, p["pretokenizers"][k], where + ".pretokenizers[" + std::to_string(k) + "]", byte_level);
    } else if (type == "ByteLevel") {
      byte_level = true;
      detail::PreTokenizerStep step;
      step.add_prefix_space = p.value("add_prefix_space", false);
      if (p.value("use_regex", true)) step.regex = std::make_shared<const Regex>(kGpt2Pattern, false, where);
      if (step.regex || step.add_prefix_space) m.steps.push_back(std::move(step));
    } else if (type == "Split") {
      detail::PreTokenizerStep step;
      if (!p.contains("pattern") || !p["pattern"].is_object()) throw FormatError(where + ": Split without \"pattern\" object");
      const auto& pat = p["pattern"];
      if (pat.contains("Regex") && pat["Regex"].is_string()) {
        step.regex = std::make_shared<const Regex>(pat["Regex"].get<std::string>(), false, where + ".pattern.Regex");
      } else if (pat.contains("String") && pat["String"].is_string()) {
        step.regex = std::make_shared<const Regex>(pat["String"].get<std::string>(), true, where + ".pattern.String");
      } else {
        throw FormatError(where + ": Split pattern needs a string \"Regex\" or \"String\"");
      }
      const std::string behavior = p.value("behavior", std::string("Isolated"));
      if (behavior == "Removed") step.behavior = SplitBehavior::Removed;
      else if (behavior == "Isolated") step.behavior = SplitBehavior::Isolated;
      else if (behavior == "MergedWithPrevious") step.behavior = SplitBehavior::MergedWithPrevious;
      else if (behavior == "MergedWithNext") step.behavior = SplitBehavior::MergedWithNext;
      else if (behavior == "Contiguous") step.behavior = SplitBehavior::Contiguous;
      else throw FormatError(where + ": unknown Split behavior \"" + behavior + "\"");
      step.invert = p.value("invert", false);
      m.steps.push_back(std::move(step));
    } else {
      throw FormatError(where + ": pre_tokenizer type \"" + type + "\" is not supported (supported: ByteLevel, Split, Sequence)");
    }
  }

  static void finish(detail::TokenizerModel& m) {
    const auto& alphabet = ByteLevelAlphabet::get();
    for (int b = 0; b < 256; ++b) {
      auto it = m.text_to_id.find(alphabet.to_utf8(static_cast<std::uint8_t>(b)));
      m.byte_id[b] = it == m.text_to_id.end() ? -1 : it->second;
    }
    for (std::size_t k = 0; k < m.added.size(); ++k) {
      const AddedToken& t = m.added[k];
      set_token(m, t.id, t.content, t.content);
      m.trie.insert(t.content, static_cast<int>(k));
      if (!t.special) m.has_non_special_added = true;
    }
    if (m.ignore_merges) {
      for (std::size_t id = 0; id < m.id_bytes.size(); ++id)
        if (m.id_assigned[id]) m.bytes_to_id.emplace(m.id_bytes[id], static_cast<int>(id));
    }
  }

  // Per-call buffers, so encode() stays const and reentrant.
  struct Scratch {
    explicit Scratch(const detail::TokenizerModel& m) {
      for (const auto& s : m.steps) match.push_back(s.regex ? std::make_unique<Regex::MatchData>(*s.regex) : nullptr);
    }
    std::vector<std::unique_ptr<Regex::MatchData>> match;
    std::vector<std::string_view> pieces, next;
    std::vector<std::pair<std::size_t, std::size_t>> spans;  // (begin, end) of a split
    std::vector<char> is_match;
    std::deque<std::string> owned;  // storage for prefixed pieces; deque keeps views valid
    std::vector<int> symbols;
  };

  void encode_segment(std::string_view seg, std::vector<int>& out, Scratch& sc) const {
    if (seg.empty()) return;
    const detail::TokenizerModel& m = *model_;
    std::string normalized;
    if (m.nfc && !is_nfc_quick(seg)) {
      normalized = nfc(seg);
      seg = normalized;
    }
    sc.pieces.clear();
    sc.pieces.push_back(seg);
    sc.owned.clear();
    for (std::size_t s = 0; s < m.steps.size(); ++s) {
      const detail::PreTokenizerStep& step = m.steps[s];
      sc.next.clear();
      for (std::string_view piece : sc.pieces) {
        if (step.add_prefix_space && !piece.starts_with(' ')) {
          std::string& prefixed = sc.owned.emplace_back();
          prefixed.reserve(piece.size() + 1);
          prefixed.push_back(' ');
          prefixed.append(piece);
          piece = prefixed;
        }
        if (!step.regex) {
          sc.next.push_back(piece);
          continue;
        }
        split_piece(piece, step, *sc.match[s], sc);
      }
      std::swap(sc.pieces, sc.next);
    }
    for (std::string_view piece : sc.pieces) encode_word(piece, out, sc);
  }

  // HF's Split step on one piece: matches and the gaps between them, combined per behavior.
  static void split_piece(std::string_view piece, const detail::PreTokenizerStep& step, Regex::MatchData& md, Scratch& sc) {
    if (step.behavior == SplitBehavior::Isolated) {
      // Every match and every gap is its own piece whatever `invert` says.
      step.regex->split(piece, md, [&](std::size_t b, std::size_t e, bool) { sc.next.push_back(piece.substr(b, e - b)); });
      return;
    }
    sc.spans.clear();
    sc.is_match.clear();
    step.regex->split(piece, md, [&](std::size_t b, std::size_t e, bool is_match) {
      sc.spans.emplace_back(b, e);
      sc.is_match.push_back(static_cast<char>(is_match != step.invert));
    });
    std::vector<std::pair<std::size_t, std::size_t>> acc;
    const std::size_t n = sc.spans.size();
    bool previous_match = false;
    switch (step.behavior) {
      case SplitBehavior::Removed:
        for (std::size_t k = 0; k < n; ++k)
          if (!sc.is_match[k]) acc.push_back(sc.spans[k]);
        break;
      case SplitBehavior::MergedWithPrevious:
        for (std::size_t k = 0; k < n; ++k) {
          if (sc.is_match[k] && !previous_match && !acc.empty()) acc.back().second = sc.spans[k].second;
          else acc.push_back(sc.spans[k]);
          previous_match = sc.is_match[k];
        }
        break;
      case SplitBehavior::MergedWithNext:
        for (std::size_t k = n; k-- > 0;) {
          if (sc.is_match[k] && !previous_match && !acc.empty()) acc.back().first = sc.spans[k].first;
          else acc.push_back(sc.spans[k]);
          previous_match = sc.is_match[k];
        }
        std::reverse(acc.begin(), acc.end());
        break;
      case SplitBehavior::Contiguous:
        for (std::size_t k = 0; k < n; ++k) {
          if (static_cast<bool>(sc.is_match[k]) == previous_match && !acc.empty()) acc.back().second = sc.spans[k].second;
          else acc.push_back(sc.spans[k]);
          previous_match = sc.is_match[k];
        }
        break;
      case SplitBehavior::Isolated:
        break;
    }
    for (auto [b, e] : acc)
      if (e > b) sc.next.push_back(piece.substr(b, e - b));
  }

  void encode_word(std::string_view word, std::vector<int>& out, Scratch& sc) const {
    const detail::TokenizerModel& m = *model_;
    const bool cacheable = word.size() <= detail::WordCache::kMaxWordBytes;
    if (cacheable) {
      std::shared_lock lock(cache_->mutex);
      auto it = cache_->map.find(word);
      if (it != cache_->map.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int>& sym = sc.symbols;
    sym.clear();
    bool whole = false;
    if (m.ignore_merges) {
      if (auto it = m.bytes_to_id.find(word); it != m.bytes_to_id.end()) {
        sym.push_back(it->second);
        whole = true;
      }
    }
    if (!whole) {
      bool last_unk = false;
      for (char ch : word) {
        const int id = m.byte_id[static_cast<unsigned char>(ch)];
        if (id >= 0) {
          sym.push_back(id);
          last_unk = false;
        } else if (m.unk_id) {
          // A byte missing from the vocabulary becomes unk (fused if asked), as in HF; without
          // an unk token HF drops it, and so do we.
          if (!(m.fuse_unk && last_unk)) sym.push_back(*m.unk_id);
          last_unk = true;
        }
      }
      detail::bpe_merge(sym, m.merges);
    }
    out.insert(out.end(), sym.begin(), sym.end());
    if (cacheable) {
      std::unique_lock lock(cache_->mutex);
      if (cache_->map.size() >= detail::WordCache::kMaxEntries) cache_->map.clear();
      cache_->map.emplace(std::string(word), sym);
    }
  }

  std::shared_ptr<const detail::TokenizerModel> model_;
  std::shared_ptr<detail::WordCache> cache_;
};

/// The tokenizer files of a HF model directory: {tokenizer.json} if present, else
/// {vocab.json, merges.txt}. Throws IoError naming the directory and what was looked for.
inline std::vector<std::filesystem::path> find_tokenizer_files(const std::filesystem::path& model_dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(model_dir, ec)) throw IoError(model_dir.string() + ": not a directory");
  const auto tj = model_dir / "tokenizer.json";
  if (std::filesystem::is_regular_file(tj, ec)) return {tj};
  const auto vj = model_dir / "vocab.json", mt = model_dir / "merges.txt";
  if (std::filesystem::is_regular_file(vj, ec) && std::filesystem::is_regular_file(mt, ec)) return {vj, mt};
  throw IoError(model_dir.string() + ": no tokenizer.json (nor vocab.json + merges.txt) in this directory");
}

inline Tokenizer Tokenizer::from_directory(const std::filesystem::path& model_dir) {
  const auto files = find_tokenizer_files(model_dir);
  return files.size() == 1 ? from_file(files[0]) : from_gpt2_files(files[0], files[1]);
}

}  // namespace cacheshrink::tokenizer
