// uniter_fast._C: the per-batch CPU work of the data path, over NumPy buffers, without torch.
//
// Python callers: uniter_fast/data/collate.py (PackPlan) and uniter_fast/data/batching.py
// (bucket_batches, permutation). Heavy work runs with the GIL released, so DataLoader worker
// threads and the main thread's Python keep running beside it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>

#include "bucket.h"
#include "plan.h"

namespace py = pybind11;
using uniter_fast::PackPlan;

namespace {

using IndexArray = py::array_t<int64_t, py::array::c_style>;

IndexArray to_numpy(const std::vector<int64_t>& v) {
  IndexArray out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(int64_t));
  return out;
}

py::tuple bucket_batches(const IndexArray& lengths, int64_t max_tokens, int64_t bucket_size,
                         int64_t size_multiple, bool drop_last, const std::string& mode,
                         uint64_t seed, const std::optional<IndexArray>& order,
                         bool shuffle_batches, bool sort_by_length) {
  if (lengths.ndim() != 1) {
    throw std::invalid_argument("bucketing: lengths must be 1-d, got " +
                                std::to_string(lengths.ndim()) + " dimensions");
  }
  const int64_t n = lengths.shape(0);
  if (order && (order->ndim() != 1 || order->shape(0) != n)) {
    throw std::invalid_argument("bucketing: order must be 1-d with one entry per length (" +
                                std::to_string(n) + ")");
  }
  uniter_fast::BucketOptions options;
  options.max_tokens = max_tokens;
  options.bucket_size = bucket_size;
  options.size_multiple = size_multiple;
  options.drop_last = drop_last;
  options.seed = seed;
  options.shuffle_batches = shuffle_batches;
  options.sort_by_length = sort_by_length;
  if (mode == "padded") {
    options.mode = uniter_fast::BucketMode::Padded;
  } else if (mode == "packed") {
    options.mode = uniter_fast::BucketMode::Packed;
  } else {
    throw std::invalid_argument("bucketing: mode must be 'padded' or 'packed', got '" + mode +
                                "'");
  }
  uniter_fast::Batches batches;
  {
    py::gil_scoped_release release;
    batches = uniter_fast::bucket_batches(lengths.data(), n, order ? order->data() : nullptr,
                                          options);
  }
  return py::make_tuple(to_numpy(batches.offsets), to_numpy(batches.indices));
}

IndexArray permutation(int64_t n, uint64_t seed) {
  if (n < 0) throw std::invalid_argument("permutation: n must be >= 0, got " + std::to_string(n));
  IndexArray out(n);
  int64_t* p = out.mutable_data();
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  uniter_fast::SplitMix64 rng(seed);
  uniter_fast::shuffle(p, n, rng);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "uniter_fast._C: packing examples into the packed batch, and token-bucket batching.\n"
      "Use it through uniter_fast.data.collate and uniter_fast.data.batching.";

  py::class_<PackPlan>(m, "PackPlan", R"doc(
A validated, sized batch of example dicts, ready to pack into caller-allocated buffers.

PackPlan(examples, task, pad_multiple=8): reads every field the task needs (ValueError or
TypeError naming the example and the field, as collate_numpy raises them) and keeps the input
arrays alive. outputs() lists (name, shape, dtype name) of every output; scalars() gives
max_seqlen, max_txt_len, max_img_len; pack_into(dict) fills the given arrays in one pass with
the GIL released.)doc")
      .def(py::init<const py::object&, const std::string&, int64_t>(), py::arg("examples"),
           py::arg("task"), py::arg("pad_multiple") = 8)
      .def("outputs", &PackPlan::outputs,
           "[(name, shape tuple, NumPy dtype name)] of every output of the task, in order.")
      .def("scalars", &PackPlan::scalars, "{max_seqlen, max_txt_len, max_img_len} as ints.")
      .def("pack_into", &PackPlan::pack_into, py::arg("out"),
           "Pack into out[name] for every name of outputs(): writeable, C-contiguous, aligned "
           "arrays of exactly the planned shape and dtype. Extra keys are ignored.")
      .def_property_readonly("task", &PackPlan::task_name)
      .def_property_readonly("num_pairs", [](const PackPlan& p) { return p.sizes().batch; })
      .def_property_readonly("num_rows", [](const PackPlan& p) { return p.sizes().rows; });

  m.def("bucket_batches", &bucket_batches, py::arg("lengths"), py::kw_only(),
        py::arg("max_tokens"), py::arg("bucket_size"), py::arg("size_multiple"),
        py::arg("drop_last"), py::arg("mode"), py::arg("seed"), py::arg("order") = py::none(),
        py::arg("shuffle_batches") = true, py::arg("sort_by_length") = true,
        "Token-bucket batches as (offsets int64 [num_batches + 1], indices int64 [total]); "
        "see uniter_fast.data.batching.token_bucket_batches.");
  m.def("permutation", &permutation, py::arg("n"), py::arg("seed"),
        "0..n-1 shuffled by Fisher-Yates over SplitMix64(seed): the bucketer's first shuffle.");
}
