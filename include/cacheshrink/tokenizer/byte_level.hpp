#pragma once
// GPT-2's byte-to-unicode alphabet: every byte value maps to one printable code point so that
// vocabulary entries are readable strings ("Ġthe" is " the"). Bytes 33..126, 161..172 and
// 174..255 map to themselves; the other 68 map to U+0100 onwards in byte order.
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "cacheshrink/tokenizer/unicode.hpp"

namespace cacheshrink::tokenizer {

class ByteLevelAlphabet {
 public:
  static const ByteLevelAlphabet& get() {
    static const ByteLevelAlphabet alphabet;
    return alphabet;
  }

  char32_t to_char(std::uint8_t b) const { return byte_to_char_[b]; }
  /// The UTF-8 text of the code point that stands for byte `b`.
  std::string_view to_utf8(std::uint8_t b) const { return byte_to_utf8_[b]; }

  /// Raw bytes of a byte-level string ("Ġthe" -> " the"), or nullopt when a character is
  /// outside the alphabet (or the text is not UTF-8).
  std::optional<std::string> to_bytes(std::string_view text) const {
    std::string out;
    out.reserve(text.size());
    for (std::size_t i = 0; i < text.size();) {
      const Utf8Char c = utf8_decode(text, i);
      if (!c.valid || c.cp >= char_to_byte_.size() || char_to_byte_[c.cp] < 0) return std::nullopt;
      out.push_back(static_cast<char>(char_to_byte_[c.cp]));
      i += c.length;
    }
    return out;
  }

  /// Byte-level string of raw bytes (" the" -> "Ġthe").
  std::string to_text(std::string_view bytes) const {
    std::string out;
    out.reserve(bytes.size() * 2);
    for (char b : bytes) out += byte_to_utf8_[static_cast<std::uint8_t>(b)];
    return out;
  }

 private:
  ByteLevelAlphabet() {
    char_to_byte_.fill(-1);
    int next = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const char32_t c = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + next++);
      byte_to_char_[b] = c;
      char_to_byte_[c] = static_cast<std::int16_t>(b);
      utf8_append(byte_to_utf8_[b], c);
    }
  }
  std::array<char32_t, 256> byte_to_char_{};
  std::array<std::string, 256> byte_to_utf8_{};
  std::array<std::int16_t, 256 + 68> char_to_byte_{};  // highest mapped code point is U+0143
};

}  // namespace cacheshrink::tokenizer
