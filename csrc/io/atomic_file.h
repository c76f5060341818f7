#pragma once
// A file that appears under its name complete or not at all: bytes go to a temporary file
// beside it, and commit() fsyncs it, renames it over the name and fsyncs the directory.
// Destroyed without commit() (an exception, a crash), it leaves the old file untouched.
#include <cstddef>
#include <cstdio>
#include <string>

namespace bpt::io {

class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t size);
  void write(const std::string& text) { write(text.data(), text.size()); }
  void commit();

 private:
  std::string path_, temp_path_;
  std::FILE* file_ = nullptr;
};

// Writes `text` to `path` atomically.
void write_file_atomically(const std::string& path, const std::string& text);

// fsyncs a directory, so that renames inside it survive a power cut.
void sync_directory(const std::string& dir);

// A directory written as a whole: files go into `<dir>.tmp-<pid>` (path()), and commit()
// swaps it with `dir` in one atomic rename (Linux renameat2 RENAME_EXCHANGE), then deletes
// the old contents. A crash before commit leaves `dir` as it was.
class AtomicDirectory {
 public:
  explicit AtomicDirectory(std::string dir);
  ~AtomicDirectory();
  AtomicDirectory(const AtomicDirectory&) = delete;
  AtomicDirectory& operator=(const AtomicDirectory&) = delete;

  const std::string& path() const { return temp_; }
  void commit();

 private:
  std::string dir_, temp_;
  bool committed_ = false;
};

}  // namespace bpt::io
