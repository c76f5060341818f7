#include "csrc/io/atomic_file.h"

#include <fcntl.h>
#include <stdio.h>  // renameat2, RENAME_EXCHANGE (glibc >= 2.28)
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "csrc/common/error.h"

namespace bpt::io {

AtomicFile::AtomicFile(std::string path)
    : path_(std::move(path)), temp_path_(path_ + ".tmp." + std::to_string(::getpid())) {
  file_ = std::fopen(temp_path_.c_str(), "wb");
  if (file_ == nullptr) throw_input_error("{}: cannot create: {}", temp_path_, std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (file_ != nullptr) {
    std::fclose(file_);
    std::remove(temp_path_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t size) {
  if (size != 0 && std::fwrite(data, 1, size, file_) != size) {
    throw_input_error("{}: write failed: {}", temp_path_, std::strerror(errno));
  }
}

void AtomicFile::commit() {
  bool ok = std::fflush(file_) == 0 && ::fsync(::fileno(file_)) == 0;
  ok = std::fclose(file_) == 0 && ok;
  file_ = nullptr;
  ok = ok && std::rename(temp_path_.c_str(), path_.c_str()) == 0;
  if (!ok) {
    const int error = errno;
    std::remove(temp_path_.c_str());
    throw_input_error("{}: cannot write: {}", path_, std::strerror(error));
  }
  const std::filesystem::path parent = std::filesystem::path(path_).parent_path();
  sync_directory(parent.empty() ? "." : parent.string());
}

void write_file_atomically(const std::string& path, const std::string& text) {
  AtomicFile file(path);
  file.write(text);
  file.commit();
}

AtomicDirectory::AtomicDirectory(std::string dir) {
  std::filesystem::path path = std::filesystem::absolute(dir).lexically_normal();
  if (!path.has_filename()) path = path.parent_path();  // "out/" -> "out"
  dir_ = path.string();
  temp_ = dir_ + ".tmp-" + std::to_string(::getpid());
  std::filesystem::remove_all(temp_);
  std::filesystem::create_directories(temp_);
}

AtomicDirectory::~AtomicDirectory() {
  if (!committed_) {
    std::error_code ignored;
    std::filesystem::remove_all(temp_, ignored);
  }
}

void AtomicDirectory::commit() {
  sync_directory(temp_);
  if (std::filesystem::exists(dir_)) {
    if (::renameat2(AT_FDCWD, temp_.c_str(), AT_FDCWD, dir_.c_str(), RENAME_EXCHANGE) != 0) {
      throw_input_error("{}: cannot replace with {}: {}", dir_, temp_, std::strerror(errno));
    }
    std::filesystem::remove_all(temp_);  // now the old contents
  } else if (std::rename(temp_.c_str(), dir_.c_str()) != 0) {
    throw_input_error("{}: cannot create from {}: {}", dir_, temp_, std::strerror(errno));
  }
  committed_ = true;
  sync_directory(std::filesystem::path(dir_).parent_path().string());
}

void sync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;  // not fatal: the data itself is synced
  ::fsync(fd);
  ::close(fd);
}

}  // namespace bpt::io
