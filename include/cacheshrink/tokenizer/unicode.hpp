#pragma once
// UTF-8 decoding that never reads past the end of its input, and Unicode NFC normalization
// (the normalizer Qwen2/Qwen3 tokenizer.json files ask for). Bytes that are not part of a
// well-formed UTF-8 sequence pass through NFC unchanged and act as barriers: nothing
// composes across them, so normalization is total on arbitrary byte strings.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "cacheshrink/tokenizer/unicode_nfc_data.hpp"

namespace cacheshrink::tokenizer {

/// One decoded character: `cp` and how many bytes it took. `length == 0` never happens;
/// an ill-formed sequence yields `valid == false`, `length == 1` (one byte consumed).
struct Utf8Char {
  char32_t cp;
  std::uint8_t length;
  bool valid;
};

/// Decodes the character starting at s[i] (i < s.size()). Strict: overlong forms,
/// surrogates and values above U+10FFFF are ill-formed, as in the Unicode standard.
inline Utf8Char utf8_decode(std::string_view s, std::size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return {b0, 1, true};
  const Utf8Char bad{b0, 1, false};
  int n;
  char32_t cp;
  char32_t min;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2, cp = b0 & 0x1Fu, min = 0x80;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3, cp = b0 & 0x0Fu, min = 0x800;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4, cp = b0 & 0x07u, min = 0x10000;
  } else {
    return bad;
  }
  if (s.size() - i < static_cast<std::size_t>(n)) return bad;
  for (int k = 1; k < n; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0u) != 0x80u) return bad;
    cp = (cp << 6) | (b & 0x3Fu);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return bad;
  return {cp, static_cast<std::uint8_t>(n), true};
}

inline void utf8_append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

/// True when every byte of `s` belongs to a well-formed UTF-8 sequence.
inline bool is_valid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    const Utf8Char c = utf8_decode(s, i);
    if (!c.valid) return false;
    i += c.length;
  }
  return true;
}

namespace detail {

// Code points >= kRawByteBase stand for ill-formed input bytes (kRawByteBase + byte): they are
// outside Unicode, so they have ccc 0, no decomposition and compose with nothing.
inline constexpr char32_t kRawByteBase = 0x110000;

// Hangul syllables compose/decompose algorithmically (Unicode 3.12).
inline constexpr char32_t kHangulS = 0xAC00, kHangulL = 0x1100, kHangulV = 0x1161, kHangulT = 0x11A7;
inline constexpr int kHangulLCount = 19, kHangulVCount = 21, kHangulTCount = 28;
inline constexpr int kHangulNCount = kHangulVCount * kHangulTCount, kHangulSCount = kHangulLCount * kHangulNCount;

inline std::uint8_t combining_class(char32_t cp) {
  const auto& t = nfc_data::kCcc;
  auto it = std::upper_bound(std::begin(t), std::end(t), cp, [](char32_t c, const nfc_data::CccRange& r) { return c < r.first; });
  if (it == std::begin(t)) return 0;
  --it;
  return cp <= it->last ? it->ccc : 0;
}

inline bool nfc_unsafe(char32_t cp) {
  if (cp >= kHangulS && cp < kHangulS + kHangulSCount) return false;  // precomposed: stable unless a T jamo follows
  const auto& t = nfc_data::kUnsafe;
  auto it = std::upper_bound(std::begin(t), std::end(t), cp, [](char32_t c, const nfc_data::Range& r) { return c < r.first; });
  if (it == std::begin(t)) return false;
  --it;
  return cp <= it->last;
}

inline void decompose_into(char32_t cp, std::vector<char32_t>& out) {
  if (cp >= kHangulS && cp < kHangulS + kHangulSCount) {
    const int s = static_cast<int>(cp - kHangulS);
    out.push_back(kHangulL + s / kHangulNCount);
    out.push_back(kHangulV + (s % kHangulNCount) / kHangulTCount);
    if (s % kHangulTCount != 0) out.push_back(kHangulT + s % kHangulTCount);
    return;
  }
  const auto& t = nfc_data::kDecomp;
  auto it = std::lower_bound(std::begin(t), std::end(t), cp, [](const nfc_data::Decomp& d, char32_t c) { return d.cp < c; });
  if (it != std::end(t) && it->cp == cp) {
    out.insert(out.end(), nfc_data::kDecompPool + it->offset, nfc_data::kDecompPool + it->offset + it->length);
  } else {
    out.push_back(cp);
  }
}

// Returns the primary composite of (a, b), or 0 when there is none.
inline char32_t compose_pair(char32_t a, char32_t b) {
  if (a >= kHangulL && a < kHangulL + kHangulLCount && b >= kHangulV && b < kHangulV + kHangulVCount)
    return kHangulS + ((a - kHangulL) * kHangulVCount + (b - kHangulV)) * kHangulTCount;
  if (a >= kHangulS && a < kHangulS + kHangulSCount && (a - kHangulS) % kHangulTCount == 0 && b > kHangulT &&
      b < kHangulT + kHangulTCount)
    return a + (b - kHangulT);
  const auto& t = nfc_data::kCompose;
  auto it = std::lower_bound(std::begin(t), std::end(t), std::pair{a, b}, [](const nfc_data::Compose& c, std::pair<char32_t, char32_t> k) {
    return c.first < k.first || (c.first == k.first && c.second < k.second);
  });
  if (it != std::end(t) && it->first == a && it->second == b) return it->composite;
  return 0;
}

}  // namespace detail

/// True when nfc(s) == s is certain without normalizing: no character of `s` can change under
/// NFC. Most text (ASCII, CJK, precomposed Latin) passes; then nfc() costs one scan.
inline bool is_nfc_quick(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const Utf8Char c = utf8_decode(s, i);
    if (c.valid && detail::nfc_unsafe(c.cp)) return false;
    i += c.length;
  }
  return true;
}

namespace detail {

// NFC of all of `s` (decomposition, canonical ordering, composition), appended to `result`.
// Ill-formed bytes are copied through unchanged.
inline void nfc_append_full(std::string_view s, std::string& result) {
  std::vector<char32_t> cps;
  cps.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    const Utf8Char c = utf8_decode(s, i);
    if (c.valid) {
      detail::decompose_into(c.cp, cps);
    } else {
      cps.push_back(detail::kRawByteBase + static_cast<unsigned char>(s[i]));
    }
    i += c.length;
  }
  auto ccc = [](char32_t cp) { return cp >= detail::kRawByteBase ? std::uint8_t{0} : detail::combining_class(cp); };
  // Canonical ordering: stable sort every run of non-starters by combining class.
  for (std::size_t i = 1; i < cps.size(); ++i) {
    const std::uint8_t ci = ccc(cps[i]);
    if (ci == 0) continue;
    std::size_t j = i;
    while (j > 0 && ccc(cps[j - 1]) > ci) {
      std::swap(cps[j - 1], cps[j]);
      --j;
    }
  }
  // Canonical composition (UAX #15 reference algorithm).
  if (!cps.empty()) {
    std::size_t starter = 0;
    int last_class = ccc(cps[0]) == 0 ? 0 : 256;  // a leading non-starter blocks composition
    std::size_t out = 1;
    for (std::size_t i = 1; i < cps.size(); ++i) {
      const char32_t ch = cps[i];
      const int ch_class = ccc(ch);
      const char32_t comp = (cps[starter] < detail::kRawByteBase && ch < detail::kRawByteBase) ? detail::compose_pair(cps[starter], ch) : 0;
      if (comp != 0 && (last_class < ch_class || last_class == 0)) {
        cps[starter] = comp;
        continue;
      }
      if (ch_class == 0) starter = out;
      last_class = ch_class;
      cps[out++] = ch;
    }
    cps.resize(out);
  }
  for (char32_t cp : cps) {
    if (cp >= detail::kRawByteBase) {
      result.push_back(static_cast<char>(cp - detail::kRawByteBase));
    } else {
      utf8_append(result, cp);
    }
  }
}

}  // namespace detail

/// Unicode Normalization Form C. Ill-formed bytes are copied through unchanged.
/// Only the stretches around characters that can change are normalized: a character with
/// ccc 0 and NFC quick check "Yes" (or an ill-formed byte) is a boundary nothing composes or
/// reorders across, so text splits there into independent spans.
inline std::string nfc(std::string_view s) {
  if (is_nfc_quick(s)) return std::string(s);
  std::string out;
  out.reserve(s.size() + 16);
  std::size_t copied = 0, last_boundary = 0, i = 0;
  auto unsafe_at = [&](std::size_t k, std::size_t& len) {
    if (static_cast<unsigned char>(s[k]) < 0x80) {
      len = 1;
      return false;
    }
    const Utf8Char c = utf8_decode(s, k);
    len = c.length;
    return c.valid && detail::nfc_unsafe(c.cp);
  };
  while (i < s.size()) {
    std::size_t len = 0;
    if (!unsafe_at(i, len)) {
      last_boundary = i;
      i += len;
      continue;
    }
    std::size_t j = i + len;
    while (j < s.size() && unsafe_at(j, len)) j += len;
    out.append(s.substr(copied, last_boundary - copied));
    detail::nfc_append_full(s.substr(last_boundary, j - last_boundary), out);
    copied = last_boundary = i = j;
  }
  out.append(s.substr(copied));
  return out;
}

}  // namespace cacheshrink::tokenizer
