#pragma once
// Attention-kind policies: map a query head to the KV head it reads, and check that a
// config really is of that kind. One attention code path serves all three.
#include <concepts>
#include <string>

#include "cacheshrink/core/config.hpp"
#include "cacheshrink/core/error.hpp"

namespace cacheshrink {

/// Every query head has its own KV head.
struct Mha {
  static constexpr AttentionKindId id = AttentionKindId::Mha;
  static constexpr int kv_head(int q_head, int /*group*/) { return q_head; }
};
/// Groups of `group` query heads share a KV head.
struct Gqa {
  static constexpr AttentionKindId id = AttentionKindId::Gqa;
  static constexpr int kv_head(int q_head, int group) { return q_head / group; }
};
/// All query heads share one KV head.
struct Mqa {
  static constexpr AttentionKindId id = AttentionKindId::Mqa;
  static constexpr int kv_head(int /*q_head*/, int /*group*/) { return 0; }
};

template <class K>
concept AttentionKind = requires(int h, int g) {
  { K::id } -> std::convertible_to<AttentionKindId>;
  { K::kv_head(h, g) } -> std::convertible_to<int>;
};

/// Throws ConfigError when `c` is not of kind K (e.g. Mqa with 2 KV heads).
template <AttentionKind K>
void check_attention_kind(const ModelConfig& c) {
  if (c.attention_kind() != K::id)
    throw ConfigError(c.source + ": model has " + std::to_string(c.n_heads) + " query heads and " + std::to_string(c.n_kv_heads) +
                      " KV heads (" + attention_kind_name(c.attention_kind()) + "), but the pipeline was instantiated for " +
                      attention_kind_name(K::id));
}

/// Runtime front door: calls fn(Mha{}), fn(Gqa{}) or fn(Mqa{}) according to the config.
template <class Fn>
decltype(auto) dispatch_attention_kind(const ModelConfig& c, Fn&& fn) {
  switch (c.attention_kind()) {
    case AttentionKindId::Mha: return fn(Mha{});
    case AttentionKindId::Gqa: return fn(Gqa{});
    case AttentionKindId::Mqa: return fn(Mqa{});
  }
  return fn(Mha{});
}

}  // namespace cacheshrink
