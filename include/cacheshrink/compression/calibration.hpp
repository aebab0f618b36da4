#pragma once
// Calibration text: paragraphs = lines, stripped, longer than `min_chars` characters (code points) and not
// starting with '=' (WikiText headings); the first `count` of them, each encoded and cut to
// `max_length` tokens. This is the protocol of the reference numbers (fixtures README).
#include <string>
#include <string_view>
#include <vector>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/tokenizer/tokenizer.hpp"

namespace cacheshrink::compression {

/// Characters (UTF-8 code points, as Python's len) of a UTF-8 string.
inline std::size_t utf8_length(std::string_view s) {
  std::size_t n = 0;
  for (unsigned char ch : s) n += (ch & 0xC0) != 0x80;
  return n;
}

inline std::vector<std::string> paragraphs(std::string_view text, std::size_t count, std::size_t min_chars = 100) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  while (pos <= text.size() && (count == 0 || out.size() < count)) {
    std::size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) nl = text.size();
    std::string_view line = text.substr(pos, nl - pos);
    const auto b = line.find_first_not_of(" \t\r\f\v");
    if (b != std::string_view::npos) {
      const auto e = line.find_last_not_of(" \t\r\f\v");
      line = line.substr(b, e - b + 1);
      if (utf8_length(line) > min_chars && line.front() != '=') out.emplace_back(line);
    }
    if (nl == text.size()) break;
    pos = nl + 1;
  }
  return out;
}

inline std::vector<std::vector<int>> encode_calibration(const tokenizer::Tokenizer& tok, const std::vector<std::string>& texts,
                                                        int max_length) {
  if (max_length < 1) throw InvalidArgument("max_calibration_length must be >= 1");
  std::vector<std::vector<int>> seqs;
  for (const auto& t : texts) {
    auto ids = tok.encode(t, /*allow_special=*/false);
    if (static_cast<int>(ids.size()) > max_length) ids.resize(static_cast<std::size_t>(max_length));
    if (!ids.empty()) seqs.push_back(std::move(ids));
  }
  return seqs;
}

}  // namespace cacheshrink::compression
