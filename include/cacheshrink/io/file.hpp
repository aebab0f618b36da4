#pragma once
// Small file helpers: read-only memory maps, whole-file reads, atomic writes
// (write to a temporary name in the same directory, then rename).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "cacheshrink/core/error.hpp"

namespace cacheshrink::io {

/// Read-only memory map of a whole file (empty files map to an empty span).
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::filesystem::path& path) : path_(path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw IoError(path.string() + ": cannot open (" + std::strerror(errno) + ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      throw IoError(path.string() + ": cannot stat (" + std::strerror(errno) + ")");
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw IoError(path.string() + ": not a regular file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        throw IoError(path.string() + ": mmap failed (" + std::strerror(errno) + ")");
      }
      data_ = static_cast<const std::byte*>(p);
    }
    ::close(fd);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& o) noexcept { swap(o); }
  MappedFile& operator=(MappedFile&& o) noexcept {
    if (this != &o) {
      release();
      swap(o);
    }
    return *this;
  }
  ~MappedFile() { release(); }

  std::span<const std::byte> bytes() const { return {data_, size_}; }
  const std::filesystem::path& path() const { return path_; }

 private:
  void swap(MappedFile& o) noexcept {
    std::swap(path_, o.path_);
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
  }
  void release() noexcept {
    if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }
  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

inline std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(path.string() + ": cannot open for reading");
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw IoError(path.string() + ": read error");
  return s;
}

/// Calls `write(stream)` on a temporary file next to `path`, then renames it into place, so a
/// failure never leaves a partial `path` behind.
inline void atomic_write(const std::filesystem::path& path, const std::function<void(std::ofstream&)>& write) {
  auto dir = path.parent_path();
  if (!dir.empty() && !std::filesystem::exists(dir)) throw IoError(path.string() + ": directory does not exist");
  std::filesystem::path tmp = path;
  tmp += ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw IoError(tmp.string() + ": cannot open for writing");
    try {
      write(out);
    } catch (...) {
      out.close();
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      throw;
    }
    out.flush();
    if (!out) {
      out.close();
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      throw IoError(tmp.string() + ": write failed (disk full?)");
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    throw IoError(path.string() + ": cannot rename temporary file into place");
  }
}

/// Little-endian uint16 token ids (the fixtures' *.ids.u16 format).
inline std::vector<int> read_ids_u16(const std::filesystem::path& path) {
  MappedFile f(path);
  auto b = f.bytes();
  if (b.size() % 2 != 0) throw FormatError(path.string() + ": size " + std::to_string(b.size()) + " is odd; expected little-endian uint16 ids");
  std::vector<int> ids(b.size() / 2);
  for (std::size_t i = 0; i < ids.size(); ++i)
    ids[i] = static_cast<int>(std::to_integer<unsigned>(b[2 * i]) | (std::to_integer<unsigned>(b[2 * i + 1]) << 8));
  return ids;
}

}  // namespace cacheshrink::io
