#pragma once
// The BPE merge step for one pre-token: bytes -> initial symbols (one per byte) -> repeatedly
// merge the adjacent pair with the lowest merge rank (leftmost on ties), exactly the order
// HF tokenizers' Word::merge_all produces.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <queue>
#include <string_view>
#include <vector>

namespace cacheshrink::tokenizer::detail {

/// Open-addressing map (left id, right id) -> (rank, merged id). Read-only after building;
/// lookups are the hot loop of BPE, so no std::unordered_map node chasing.
class PairMap {
 public:
  struct Value {
    int rank;
    int id;
  };

  void reserve(std::size_t n) {
    std::size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    keys_.assign(cap, kEmpty);
    values_.assign(cap, Value{0, 0});
    mask_ = cap - 1;
    size_ = 0;
  }

  /// Inserts unless present (HF keeps the first occurrence of a duplicated merge).
  bool insert(int a, int b, Value v) {
    if (keys_.empty() || 2 * (size_ + 1) > keys_.size()) grow();
    const std::uint64_t k = key(a, b);
    for (std::size_t i = slot(k);; i = (i + 1) & mask_) {
      if (keys_[i] == k) return false;
      if (keys_[i] == kEmpty) {
        keys_[i] = k;
        values_[i] = v;
        ++size_;
        return true;
      }
    }
  }

  const Value* find(int a, int b) const {
    if (keys_.empty()) return nullptr;
    const std::uint64_t k = key(a, b);
    for (std::size_t i = slot(k);; i = (i + 1) & mask_) {
      if (keys_[i] == k) return &values_[i];
      if (keys_[i] == kEmpty) return nullptr;
    }
  }

  std::size_t size() const { return size_; }

 private:
  static constexpr std::uint64_t kEmpty = ~std::uint64_t{0};  // ids are non-negative ints, never all ones
  static std::uint64_t key(int a, int b) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
  }
  std::size_t slot(std::uint64_t k) const {
    return static_cast<std::size_t>((k * 0x9E3779B97F4A7C15ull) >> 29) & mask_;
  }
  void grow() {
    std::vector<std::uint64_t> old_keys = std::move(keys_);
    std::vector<Value> old_values = std::move(values_);
    reserve(old_keys.empty() ? 8 : old_keys.size());
    for (std::size_t i = 0; i < old_keys.size(); ++i)
      if (old_keys[i] != kEmpty) insert(static_cast<int>(old_keys[i] >> 32), static_cast<int>(old_keys[i] & 0xFFFFFFFFu), old_values[i]);
  }
  std::vector<std::uint64_t> keys_;
  std::vector<Value> values_;
  std::size_t mask_ = 0;
  std::size_t size_ = 0;
};

// Below this many symbols a rescan per merge beats heap bookkeeping.
inline constexpr std::size_t kBpeHeapThreshold = 48;

/// Merges `symbols` in place (ids); the result is the token sequence of the word.
inline void bpe_merge(std::vector<int>& symbols, const PairMap& merges) {
  constexpr int kNone = std::numeric_limits<int>::max();
  const std::size_t n0 = symbols.size();
  if (n0 < 2) return;
  if (n0 <= kBpeHeapThreshold) {
    // ranks[i]: rank of the pair (symbols[i], symbols[i+1]).
    int ranks[kBpeHeapThreshold];
    int ids[kBpeHeapThreshold];
    auto pair_at = [&](std::size_t i) {
      const PairMap::Value* v = merges.find(symbols[i], symbols[i + 1]);
      ranks[i] = v ? v->rank : kNone;
      ids[i] = v ? v->id : -1;
    };
    std::size_t n = n0;
    for (std::size_t i = 0; i + 1 < n; ++i) pair_at(i);
    while (n >= 2) {
      std::size_t best = 0;
      for (std::size_t i = 1; i + 1 < n; ++i)
        if (ranks[i] < ranks[best]) best = i;
      if (ranks[best] == kNone) break;
      symbols[best] = ids[best];
      for (std::size_t i = best + 1; i + 1 < n; ++i) {
        symbols[i] = symbols[i + 1];
        ranks[i] = ranks[i + 1];
        ids[i] = ids[i + 1];
      }
      --n;
      if (best > 0) pair_at(best - 1);
      if (best + 1 < n) pair_at(best);
    }
    symbols.resize(n);
    return;
  }
  // Long words: doubly linked symbols + min-heap of candidate merges keyed by (rank, position),
  // stale entries detected on pop, as in HF's Word::merge_all. O(n log n).
  struct Candidate {
    int rank;
    int pos;
    int id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  const int n = static_cast<int>(n0);
  std::vector<int> prev(n), next(n);
  std::vector<char> alive(n, 1);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  for (int i = 0; i + 1 < n; ++i)
    if (const auto* v = merges.find(symbols[i], symbols[i + 1])) heap.push({v->rank, i, v->id});
  while (!heap.empty()) {
    const Candidate top = heap.top();
    heap.pop();
    if (!alive[top.pos] || next[top.pos] < 0) continue;
    const int right = next[top.pos];
    const auto* v = merges.find(symbols[top.pos], symbols[right]);
    if (v == nullptr || v->id != top.id) continue;  // the pair changed since this entry was pushed
    symbols[top.pos] = top.id;
    alive[right] = 0;
    next[top.pos] = next[right];
    if (next[right] >= 0) prev[next[right]] = top.pos;
    if (prev[top.pos] >= 0)
      if (const auto* p = merges.find(symbols[prev[top.pos]], symbols[top.pos])) heap.push({p->rank, prev[top.pos], p->id});
    if (next[top.pos] >= 0)
      if (const auto* p = merges.find(symbols[top.pos], symbols[next[top.pos]])) heap.push({p->rank, top.pos, p->id});
  }
  std::size_t out = 0;
  for (int i = 0; i >= 0; i = next[i]) symbols[out++] = symbols[i];
  symbols.resize(out);
}

}  // namespace cacheshrink::tokenizer::detail
