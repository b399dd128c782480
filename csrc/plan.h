// The Python boundary of the packer: a plan reads and validates a list of example dicts, sizes
// every output, and later packs into buffers the caller allocated (NumPy arrays, or NumPy views
// of pinned or shared-memory torch tensors).
//
//     plan = PackPlan(examples, "mrfr", 8)      # validates; holds the GIL
//     specs = plan.outputs()                   # [(name, shape, dtype name), ...]
//     plan.pack_into({name: array, ...})       # one pass, GIL released
//
// Input errors name the example and the field: ValueError (std::invalid_argument) for shapes,
// values and missing fields, TypeError for wrong types, as `collate_numpy` raises them.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "pack.h"

namespace uniter_fast {

namespace py = pybind11;

struct OutputSpec {
  const char* name;
  std::vector<int64_t> shape;
  DType dtype;
};

class PackPlan {
 public:
  PackPlan(const py::object& examples, const std::string& task, int64_t pad_multiple);

  // [(name, shape tuple, NumPy dtype name)] of every output of the task, in a fixed order.
  py::list outputs() const;
  // The integer fields: max_seqlen, max_txt_len, max_img_len.
  py::dict scalars() const;
  // Packs into `out[name]` for every output (extra keys are ignored); each must be a writeable,
  // C-contiguous, aligned, native-endian array of exactly the planned shape and dtype.
  void pack_into(const py::dict& out) const;

  const std::string& task_name() const { return task_name_; }
  const PackSizes& sizes() const { return sizes_; }

 private:
  std::vector<OutputSpec> output_specs() const;

  Task task_;
  std::string task_name_;
  PackSizes sizes_;
  std::vector<ExampleRef> examples_;
  // The (possibly converted) input arrays the ExampleRefs point into, kept alive with the plan.
  std::vector<py::object> keep_;
};

}  // namespace uniter_fast
