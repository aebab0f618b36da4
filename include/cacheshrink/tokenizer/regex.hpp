#pragma once
// Thin RAII wrapper over PCRE2 (8-bit) for pre-tokenizer patterns. Compiled with UTF + UCP so
// \p{L}, \s, \w and (?i) follow Unicode like the Oniguruma engine HF tokenizers uses, with
// PCRE2_MATCH_INVALID_UTF so that ill-formed UTF-8 is never an error: such bytes simply match
// nothing (no character class, not even [^...], matches them), and JIT when available.
#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/tokenizer/unicode.hpp"

namespace cacheshrink::tokenizer {

class Regex {
 public:
  /// `literal` compiles `pattern` as a plain string (HF's Split {"String": ...}).
  /// `where` names the source for error messages (file and JSON path).
  Regex(std::string_view pattern, bool literal, const std::string& where) {
    int err = 0;
    PCRE2_SIZE err_offset = 0;
    // PCRE2_LITERAL rejects UCP (it has no classes to apply it to).
    const std::uint32_t options = PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    const std::string source = literal ? std::string(pattern) : oniguruma_spaces(pattern);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(source.data()), source.size(), options, &err,
                                     &err_offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof buf);
      throw FormatError(where + ": cannot compile regex /" + std::string(pattern) + "/ at offset " +
                        std::to_string(err_offset) + ": " + reinterpret_cast<const char*>(buf));
    }
    code_.reset(code);
    // JIT is an optimization only: if it is unavailable the interpreter gives the same matches.
    jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  }

  /// Per-thread scratch for matching; create one per encode call.
  class MatchData {
   public:
    explicit MatchData(const Regex& re) : data_(pcre2_match_data_create_from_pattern(re.code_.get(), nullptr)) {
      if (data_ == nullptr) throw std::bad_alloc();
    }
    MatchData(const MatchData&) = delete;
    MatchData& operator=(const MatchData&) = delete;
    ~MatchData() { pcre2_match_data_free(data_); }
    pcre2_match_data* get() const { return data_; }

   private:
    pcre2_match_data* data_;
  };

  /// Calls on_piece(begin, end, is_match) for every match of the pattern in `text` and for
  /// the gaps between matches, left to right, covering `text` exactly. Empty matches are
  /// skipped. If PCRE2 fails (a resource limit on pathological input), the rest of `text`
  /// is reported as one gap, so callers still see every byte.
  template <class OnPiece>
  void split(std::string_view text, MatchData& md, OnPiece&& on_piece) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    std::size_t pos = 0;   // next byte to report
    std::size_t from = 0;  // where to search next
    while (from < text.size()) {
      int rc = pcre2_match(code_.get(), subject, text.size(), from, 0, md.get(), nullptr);
      if (rc < 0 && rc != PCRE2_ERROR_NOMATCH && jit_) {
        // JIT stack exhausted (or similar): the interpreter keeps its backtracking on the heap.
        rc = pcre2_match(code_.get(), subject, text.size(), from, PCRE2_NO_JIT, md.get(), nullptr);
      }
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      std::size_t b = ov[0], e = ov[1];
      if (b > text.size() || e > text.size() || e < b) break;  // defensive: never trust offsets blindly
      if (e == b) {
        // Step over one character (one byte if ill-formed) so the search always advances.
        from = b + (b < text.size() ? utf8_decode(text, b).length : 1);
        continue;
      }
      if (b > pos) on_piece(pos, b, false);
      on_piece(b, e, true);
      pos = from = e;
    }
    if (pos < text.size()) on_piece(pos, text.size(), false);
  }

  bool jit() const { return jit_; }

  /// PCRE2's \s also matches U+180E (MONGOLIAN VOWEL SEPARATOR, whitespace before Unicode
  /// 6.3); Oniguruma's, which HF tokenizers runs, is exactly the White_Space property. So
  /// \s and \S become \p{White_Space} and \P{White_Space}, which work inside and outside
  /// character classes. Escaped backslashes and \Q...\E quoting are respected.
  static std::string oniguruma_spaces(std::string_view p) {
    std::string out;
    out.reserve(p.size() + 32);
    bool quoted = false;
    for (std::size_t i = 0; i < p.size(); ++i) {
      if (p[i] != '\\' || i + 1 == p.size()) {
        out.push_back(p[i]);
        continue;
      }
      const char c = p[i + 1];
      if (quoted) {
        if (c == 'E') quoted = false;
        out.append(p.substr(i, 2));
      } else if (c == 's') {
        out += "\\p{White_Space}";
      } else if (c == 'S') {
        out += "\\P{White_Space}";
      } else {
        if (c == 'Q') quoted = true;
        out.append(p.substr(i, 2));
      }
      ++i;
    }
    return out;
  }

 private:
  struct Free {
    void operator()(pcre2_code* c) const { pcre2_code_free(c); }
  };
  std::unique_ptr<pcre2_code, Free> code_;
  bool jit_ = false;
};

}  // namespace cacheshrink::tokenizer
