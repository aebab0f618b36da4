#pragma once
// Error hierarchy. Every run-time failure caused by input (files, configs, options) throws a
// subclass of cacheshrink::Error whose message names the file/tensor/option and what was
// expected. Device code never throws; host wrappers check statuses and throw these.
#include <stdexcept>
#include <string>

namespace cacheshrink {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A file could not be opened, read, mapped or written.
class IoError : public Error {
 public:
  using Error::Error;
};

/// A file exists but its contents are malformed (safetensors header, JSON, ids file, ...).
class FormatError : public Error {
 public:
  using Error::Error;
};

/// A model config is unsupported or inconsistent.
class ConfigError : public Error {
 public:
  using Error::Error;
};

/// A tensor has the wrong dtype, shape or is missing.
class TensorError : public Error {
 public:
  using Error::Error;
};

/// A user-supplied option or argument is invalid.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// Numerical trouble (NaN loss, non-convergent decomposition).
class NumericalError : public Error {
 public:
  using Error::Error;
};

}  // namespace cacheshrink

#define CACHESHRINK_CHECK(cond, ExcType, msg) \
  do {                                        \
    if (!(cond)) throw ExcType(msg);          \
  } while (0)
