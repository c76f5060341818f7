// JSONL corpora, llamabpt's text processor, packing with segment ids and exact loader resume.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "csrc/common/error.h"
#include "csrc/data/jsonl.h"
#include "csrc/data/loader.h"
#include "csrc/data/text_processor.h"
#include "csrc/data/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using Catch::Contains;

fs::path scratch(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("bpt_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// A SentencePiece model trained on a Debian licence text, once per test binary run.
const bpt::data::Tokenizer& tokenizer() {
  static const bpt::data::Tokenizer instance = [] {
    const fs::path dir = scratch("spm");
    const std::string command = "spm_train --input=/usr/share/common-licenses/GPL-3 --model_prefix=" +
                                (dir / "spm").string() +
                                " --vocab_size=512 --model_type=bpe --byte_fallback=true --minloglevel=2 >/dev/null 2>&1";
    REQUIRE(std::system(command.c_str()) == 0);
    return bpt::data::Tokenizer((dir / "spm.model").string());
  }();
  return instance;
}

fs::path write_jsonl(const fs::path& path, const std::vector<std::string>& lines) {
  std::ofstream stream(path);
  for (const std::string& line : lines) stream << line << "\n";
  return path;
}

std::vector<int64_t> concat(std::vector<int64_t> a, const std::vector<int64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace

TEST_CASE("the text processor follows llamabpt's field syntax", "[data]") {
  const auto& tok = tokenizer();
  const nlohmann::json doc = {{"prompt", "Copyright"}, {"response", "free software"}, {"title", "GNU"}};
  const bpt::data::TextProcessor plain(tok, "response");
  auto out = plain(doc, "x.jsonl:1");
  REQUIRE(out.tokens == concat(concat({tok.bos_id()}, tok.encode("free software", false)), {tok.eos_id()}));
  REQUIRE(out.loss_mask.front() == 0);
  REQUIRE(out.loss_mask.back() == 1);

  const bpt::data::TextProcessor sft(tok, "[prompt],response");
  out = sft(doc, "x.jsonl:1");
  const size_t prompt_len = tok.encode("Copyright", false).size();
  for (size_t i = 0; i < out.tokens.size(); ++i) REQUIRE(out.loss_mask[i] == (i >= 1 + prompt_len ? 1 : 0));

  const bpt::data::TextProcessor joined(tok, "title+response,<|eos|>", /*add_bos=*/false, /*add_eos=*/false);
  REQUIRE(joined(doc, "x.jsonl:1").tokens == concat(tok.encode("GNU free software", false), {tok.eos_id()}));
  REQUIRE_THROWS_WITH(plain({{"text", "x"}}, "data.jsonl:7"), Contains("data.jsonl:7: no field 'response'"));
  REQUIRE_THROWS_WITH(plain({{"response", 3}}, "data.jsonl:8"), Contains("data.jsonl:8: field 'response' is number"));
}

TEST_CASE("a chat field follows LLaMA-2's template, loss on the answers and their EOS only", "[data]") {
  const auto& tok = tokenizer();
  const nlohmann::json doc = {{"messages",
                               {{{"role", "system"}, {"content", "Be brief."}},
                                {{"role", "user"}, {"content", "Name a licence."}},
                                {{"role", "assistant"}, {"content", "GPL"}},
                                {{"role", "user"}, {"content", "Another?"}},
                                {{"role", "assistant"}, {"content", "LGPL"}}}}};
  const bpt::data::TextProcessor chat(tok, "messages");
  const auto out = chat(doc, "chat.jsonl:1");
  // BOS [INST] <<SYS>>..<</SYS>> user [/INST] answer EOS BOS [INST] user [/INST] answer EOS: no second EOS.
  const auto first = tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a licence. [/INST]", false);
  const auto second = tok.encode("[INST] Another? [/INST]", false);
  const auto gpl = tok.encode("GPL", false), lgpl = tok.encode("LGPL", false);
  std::vector<int64_t> want = concat(concat({tok.bos_id()}, first), concat(gpl, {tok.eos_id(), tok.bos_id()}));
  want = concat(concat(want, second), concat(lgpl, {tok.eos_id()}));
  REQUIRE(out.tokens == want);
  std::vector<uint8_t> mask(want.size(), 0);
  const size_t answer1 = 1 + first.size(), answer2 = answer1 + gpl.size() + 2 + second.size();
  for (size_t i = answer1; i <= answer1 + gpl.size(); ++i) mask[i] = 1;  // the answer and its EOS
  for (size_t i = answer2; i <= answer2 + lgpl.size(); ++i) mask[i] = 1;
  REQUIRE(out.loss_mask == mask);

  const auto bad = [&](const nlohmann::json& messages) { return chat({{"messages", messages}}, "chat.jsonl:4"); };
  REQUIRE_THROWS_WITH(bad({{{"role", "assistant"}, {"content", "x"}}}),
                      Contains("chat.jsonl:4: field 'messages': message 0 has role 'assistant', expected system or user"));
  REQUIRE_THROWS_WITH(bad({{{"role", "user"}, {"content", "x"}}, {{"role", "user"}, {"content", "y"}}}),
                      Contains("message 1 has role 'user', expected assistant"));
  REQUIRE_THROWS_WITH(bad({{{"role", "user"}}}), Contains("message 0: expected {\"role\": str, \"content\": str}"));
  REQUIRE_THROWS_WITH(bad(nlohmann::json::array()), Contains("a chat needs at least one user message"));
  for (const char* role : {"", "or", "assist", "users"}) {
    REQUIRE_THROWS_WITH(bad({{{"role", "user"}, {"content", "x"}}, {{"role", role}, {"content", "y"}}}),
                        Contains(fmt::format("message 1 has role '{}', expected assistant", role)));
  }
  // A last question needs an answer after it: in the chat, or in a later field.
  REQUIRE_THROWS_WITH(bad({{{"role", "user"}, {"content", "x"}}}), Contains("the chat ends with a user message"));
  const bpt::data::TextProcessor prompted(tok, "[messages],response");
  const nlohmann::json question = {{"messages", {{{"role", "user"}, {"content", "Name a licence."}}}},
                                   {"response", "GPL"}};
  const auto answered = prompted(question, "chat.jsonl:5");
  REQUIRE(answered.tokens.back() == tok.eos_id());
  REQUIRE(std::count(answered.loss_mask.begin(), answered.loss_mask.end(), 1) == static_cast<long>(gpl.size() + 1));
}

TEST_CASE("a malformed JSONL line is named by file and line", "[data]") {
  const fs::path dir = scratch("jsonl");
  const fs::path path = write_jsonl(dir / "d.jsonl", {R"({"text": "a"})", "", R"({"text": "b"})", R"({"text": )"});
  const bpt::data::JsonlCorpus corpus({path.string()});
  REQUIRE(corpus.size() == 3);  // the blank line is skipped, line numbers are kept
  REQUIRE(corpus.document(1)["text"] == "b");
  REQUIRE(corpus.where(1) == path.string() + ":3");
  REQUIRE_THROWS_WITH(corpus.document(2), Contains(path.string() + ":4: not valid JSON"));
  REQUIRE_THROWS_WITH(bpt::data::JsonlCorpus({(dir / "none.jsonl").string()}), Contains("cannot open"));
  fs::remove_all(dir);
}

TEST_CASE("packing: documents end to end, targets within a document, a segment each", "[data]") {
  const fs::path dir = scratch("pack");
  std::vector<std::string> lines;
  const std::vector<std::string> texts = {"This License", "the GNU General Public License", "free software",
                                          "Copyright (C) 2007 Free Software Foundation, Inc."};
  for (const std::string& text : texts) lines.push_back(nlohmann::json{{"text", text}}.dump());
  auto corpus = std::make_shared<bpt::data::JsonlCorpus>(
      std::vector<std::string>{write_jsonl(dir / "d.jsonl", lines).string()});
  auto processor = std::make_shared<bpt::data::TextProcessor>(tokenizer(), "text");
  bpt::data::PackingOptions options;
  options.seq_length = 7;
  options.batch_size = 3;
  options.shuffle = false;
  bpt::data::PackedLoader loader(corpus, processor, options);

  // The expected stream: every document's tokens, the next token as target inside it.
  std::vector<int64_t> stream, expected_targets, doc_of;
  for (size_t d = 0; d < texts.size(); ++d) {
    const auto doc = (*processor)(corpus->document(static_cast<int64_t>(d)), "");
    for (size_t k = 0; k < doc.tokens.size(); ++k) {
      stream.push_back(doc.tokens[k]);
      expected_targets.push_back(k + 1 < doc.tokens.size() ? doc.tokens[k + 1] : -100);
      doc_of.push_back(static_cast<int64_t>(d));
    }
  }
  const bpt::data::Batch batch = loader.next();
  REQUIRE(batch.input_ids.sizes() == at::IntArrayRef({3, 7}));
  for (int64_t i = 0; i < 21; ++i) {
    const int64_t row = i / 7, t = i % 7;
    INFO("token " << i);
    REQUIRE(batch.input_ids[row][t].item<int64_t>() == stream[i]);
    REQUIRE(batch.targets[row][t].item<int64_t>() == expected_targets[i]);
    // Segment ids count documents from 1 within each row.
    const int64_t first_doc = doc_of[row * 7];
    REQUIRE(batch.segment_ids[row][t].item<int64_t>() == 1 + doc_of[i] - first_doc);
  }
  fs::remove_all(dir);
}

TEST_CASE("a restored loader replays the same batches, whatever the thread count", "[data]") {
  const fs::path dir = scratch("resume");
  std::vector<std::string> lines;
  for (int i = 0; i < 40; ++i) lines.push_back(nlohmann::json{{"text", "document number " + std::to_string(i)}}.dump());
  auto corpus = std::make_shared<bpt::data::JsonlCorpus>(
      std::vector<std::string>{write_jsonl(dir / "d.jsonl", lines).string()});
  auto processor = std::make_shared<bpt::data::TextProcessor>(tokenizer(), "text");
  bpt::data::PackingOptions options;
  options.seq_length = 16;
  options.batch_size = 4;
  options.seed = 5;
  bpt::data::PackedLoader straight(corpus, processor, options);
  std::vector<bpt::data::Batch> batches;
  nlohmann::json state_after_3;
  for (int i = 0; i < 8; ++i) {  // past one epoch: 40 documents of about 6 tokens
    if (i == 3) state_after_3 = straight.state();
    batches.push_back(straight.next());
  }
  options.tokenizer_threads = 3;
  bpt::data::PackedLoader resumed(corpus, processor, options);
  resumed.restore(state_after_3);
  for (int i = 3; i < 8; ++i) {
    const bpt::data::Batch batch = resumed.next();
    REQUIRE(at::equal(batch.input_ids, batches[i].input_ids));
    REQUIRE(at::equal(batch.targets, batches[i].targets));
    REQUIRE(at::equal(batch.segment_ids, batches[i].segment_ids));
  }
  REQUIRE_THROWS_WITH(resumed.restore({{"synthetic_batches", 3}}), Contains("of a JSON dataset"));
  fs::remove_all(dir);
}

TEST_CASE("a document seen again in the same row gets a segment of its own", "[data]") {
  const fs::path dir = scratch("single");
  auto corpus = std::make_shared<bpt::data::JsonlCorpus>(
      std::vector<std::string>{write_jsonl(dir / "d.jsonl", {R"({"text": "GNU"})"}).string()});
  auto processor = std::make_shared<bpt::data::TextProcessor>(tokenizer(), "text");
  const int64_t n = static_cast<int64_t>((*processor)(corpus->document(0), "").tokens.size());
  bpt::data::PackingOptions options;
  options.seq_length = 3 * n;
  options.batch_size = 1;
  bpt::data::PackedLoader loader(corpus, processor, options);
  const bpt::data::Batch batch = loader.next();
  for (int64_t t = 0; t < 3 * n; ++t) {
    REQUIRE(batch.segment_ids[0][t].item<int64_t>() == 1 + t / n);
    REQUIRE((batch.targets[0][t].item<int64_t>() == -100) == (t % n == n - 1));
  }
  fs::remove_all(dir);
}

TEST_CASE("the document order is a seeded permutation", "[data]") {
  const auto a = bpt::data::permutation(100, 1), b = bpt::data::permutation(100, 1), c = bpt::data::permutation(100, 2);
  REQUIRE(a == b);
  REQUIRE(a != c);
  auto sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 100; ++i) REQUIRE(sorted[i] == i);
}
