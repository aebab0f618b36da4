#pragma once
// A small progress reporter for long work: done/total, rate and ETA on stderr. Redraws in
// place on a terminal; elsewhere prints a line at most every `interval` seconds.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>

namespace cacheshrink {

class Progress {
 public:
  Progress(std::string label, long long total, std::string unit = "items", bool enabled = true, double interval_s = 2.0)
      : label_(std::move(label)), unit_(std::move(unit)), total_(total), enabled_(enabled), tty_(::isatty(2) != 0),
        interval_(tty_ ? 0.1 : interval_s), start_(clock::now()), last_(start_) {}

  /// Reports `done` units of work so far (and optionally a rate in another unit).
  void update(long long done, double extra_count = 0, const char* extra_unit = nullptr) {
    if (!enabled_) return;
    const auto now = clock::now();
    if (done < total_ && std::chrono::duration<double>(now - last_).count() < interval_) return;
    last_ = now;
    const double el = elapsed();
    const double frac = total_ > 0 ? static_cast<double>(done) / static_cast<double>(total_) : 1.0;
    const double eta = frac > 0 ? el * (1.0 - frac) / frac : 0.0;
    char buf[256];
    int n = std::snprintf(buf, sizeof buf, "%s: %lld/%lld %s (%5.1f%%) %.1fs elapsed, ETA %.1fs", label_.c_str(), done, total_,
                          unit_.c_str(), 100.0 * frac, el, eta);
    if (extra_unit != nullptr && el > 0)
      std::snprintf(buf + n, sizeof buf - static_cast<std::size_t>(n), ", %.0f %s/s", extra_count / el, extra_unit);
    std::fprintf(stderr, tty_ ? "\r%s\033[K" : "%s\n", buf);
    if (tty_ && done >= total_) std::fputc('\n', stderr);
    std::fflush(stderr);
  }
  double elapsed() const { return std::chrono::duration<double>(clock::now() - start_).count(); }

 private:
  using clock = std::chrono::steady_clock;
  std::string label_, unit_;
  long long total_;
  bool enabled_, tty_;
  double interval_;
  clock::time_point start_, last_;
};

}  // namespace cacheshrink
