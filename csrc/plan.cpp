// Reading, validating and sizing a batch of example dicts (see plan.h). The checks and their
// order follow `collate_numpy` (uniter_fast/data/collate.py), so both raise the same error for
// the same bad batch. Where the packer is stricter than NumPy's casts (integer txt_labels, a
// float img_loc, no long double) it says so in a TypeError.
#include "plan.h"

#include <algorithm>
#include <unordered_map>

namespace uniter_fast {
namespace {

constexpr int kNpyAligned = 0x0100;  // NPY_ARRAY_ALIGNED
constexpr int64_t kInt32Max = 2147483647;
constexpr int64_t kLocDim = 7;  // schema.LOC_DIM

std::string prefix(size_t i) { return "example " + std::to_string(i) + ": "; }

[[noreturn]] void value_error(const std::string& msg) { throw std::invalid_argument(msg); }
[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }

// Python's repr of a shape tuple: (), (3,), (2, 3).
template <typename Dims>
std::string shape_str(const Dims& dims, size_t ndim) {
  std::string s = "(";
  for (size_t d = 0; d < ndim; ++d) {
    if (d) s += ", ";
    s += std::to_string(dims[d]);
  }
  if (ndim == 1) s += ",";
  return s + ")";
}

std::string shape_str(const py::array& a) {
  return shape_str(a.shape(), static_cast<size_t>(a.ndim()));
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

char kind_of(const py::array& a) { return py::detail::array_descriptor_proxy(a.dtype().ptr())->kind; }

bool native_byte_order(const py::array& a) {
  const char order = py::detail::array_descriptor_proxy(a.dtype().ptr())->byteorder;
  if (order == '=' || order == '|') return true;
  const uint16_t probe = 1;
  const bool little = *reinterpret_cast<const uint8_t*>(&probe) == 1;
  return order == (little ? '<' : '>');
}

DType dtype_of(const py::array& a) {
  const auto size = a.itemsize();
  switch (kind_of(a)) {
    case 'b': return size == 1 ? DType::Bool : DType::Other;
    case 'i':
      switch (size) {
        case 1: return DType::I8;
        case 2: return DType::I16;
        case 4: return DType::I32;
        case 8: return DType::I64;
        default: return DType::Other;
      }
    case 'u':
      switch (size) {
        case 1: return DType::U8;
        case 2: return DType::U16;
        case 4: return DType::U32;
        case 8: return DType::U64;
        default: return DType::Other;
      }
    case 'f':
      switch (size) {
        case 2: return DType::F16;
        case 4: return DType::F32;
        case 8: return DType::F64;
        default: return DType::Other;  // long double
      }
    default: return DType::Other;
  }
}

// numpy.asarray and numpy.require, looked up once per plan.
struct NumPy {
  py::object asarray;
  py::object require;
  NumPy() {
    py::module_ np = py::module_::import("numpy");
    asarray = np.attr("asarray");
    require = np.attr("require");
  }

  // np.asarray(obj): arrays (and subclasses) as they are, anything else converted.
  py::array array(py::handle obj) const {
    if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj);
    return asarray(obj).cast<py::array>();
  }

  // The same data as a C-contiguous, aligned, native-endian array: the only layout the kernel
  // reads. Arrays that already are (every array the task builders make) pass through uncopied.
  py::array packable(const py::array& a) const {
    const int flags = a.flags();
    if ((flags & py::array::c_style) && (flags & kNpyAligned) && native_byte_order(a)) return a;
    return require(a, a.dtype().attr("newbyteorder")("="), "CA").cast<py::array>();
  }
};

// ex[name], with the oracle's errors: a missing key is a ValueError naming the example and the
// field, a non-subscriptable example a TypeError; anything else propagates as raised.
py::object get_field(py::handle ex, py::handle key, size_t i, const char* name) {
  PyObject* value = PyObject_GetItem(ex.ptr(), key.ptr());
  if (value != nullptr) return py::reinterpret_steal<py::object>(value);
  if (PyErr_ExceptionMatches(PyExc_KeyError)) {
    PyErr_Clear();
    value_error(prefix(i) + "missing field '" + name + "'");
  }
  if (PyErr_ExceptionMatches(PyExc_TypeError)) {
    PyErr_Clear();
    const std::string type_name = py::str(py::type::handle_of(ex).attr("__name__"));
    type_error(prefix(i) + "expected a dict, got " + type_name);
  }
  throw py::error_already_set();
}

void check_2d(const py::array& a, size_t i, const char* name, int64_t rows, int64_t cols) {
  // rows/cols < 0: any size (the oracle's None).
  if (a.ndim() != 2 || (rows >= 0 && a.shape(0) != rows) || (cols >= 0 && a.shape(1) != cols)) {
    const std::string want = "(" + (rows >= 0 ? std::to_string(rows) : std::string("n")) + ", " +
                             (cols >= 0 ? std::to_string(cols) : std::string("d")) + ")";
    value_error(prefix(i) + name + " has shape " + shape_str(a) + ", expected " + want);
  }
}

// The oracle's _feature_dtype check, then the packer's narrower set of float types.
void check_floats(const std::vector<py::array>& arrays, const char* name) {
  for (size_t i = 0; i < arrays.size(); ++i) {
    if (kind_of(arrays[i]) != 'f') {
      type_error(prefix(i) + name + " must be floating point, got " + dtype_str(arrays[i]));
    }
  }
  for (size_t i = 0; i < arrays.size(); ++i) {
    if (!is_float(dtype_of(arrays[i]))) {
      type_error(prefix(i) + name + " has dtype " + dtype_str(arrays[i]) +
                 "; the C++ packer reads float16, float32 and float64");
    }
  }
}

// float16 when every array is float16 (half the bytes to move), else float32.
DType output_float(const std::vector<py::array>& arrays) {
  for (const auto& a : arrays) {
    if (dtype_of(a) != DType::F16) return DType::F32;
  }
  return DType::F16;
}

int64_t count_targets(const void* labels, DType t, int64_t n) {
  int64_t count = 0;
  with_int_type(t, [&](auto tag) {
    using T = decltype(tag);
    const T* s = static_cast<const T*>(labels);
    for (int64_t j = 0; j < n; ++j) count += static_cast<int64_t>(s[j]) != -1;
  });
  return count;
}

Task parse_task(const std::string& task) {
  if (task == "mlm") return Task::MLM;
  if (task == "mrfr") return Task::MRFR;
  if (task == "mrc") return Task::MRC;
  if (task == "mrckl") return Task::MRCKL;
  if (task == "itm") return Task::ITM;
  if (task == "pairs") return Task::PAIRS;
  value_error("unknown task '" + task + "'; expected one of mlm, mrfr, mrc, mrckl, itm, pairs");
}

}  // namespace

PackPlan::PackPlan(const py::object& examples, const std::string& task, int64_t pad_multiple)
    : task_(parse_task(task)), task_name_(task) {
  if (pad_multiple < 1) {
    value_error("collate: pad_multiple must be >= 1, got " + std::to_string(pad_multiple));
  }
  const NumPy np;
  PyObject* fast = PySequence_Fast(examples.ptr(), "collate: examples must be a sequence");
  if (fast == nullptr) throw py::error_already_set();
  const auto items_owner = py::reinterpret_steal<py::object>(fast);
  const auto batch = static_cast<size_t>(PySequence_Fast_GET_SIZE(fast));
  PyObject** items = PySequence_Fast_ITEMS(fast);
  if (batch == 0) value_error("collate: no examples");

  // Look the fields up as the oracle does: every input_ids, then every img_feat, then img_loc.
  auto gather = [&](const char* name) {
    const py::str key(name);
    std::vector<py::array> arrays(batch);
    for (size_t i = 0; i < batch; ++i) arrays[i] = np.array(get_field(items[i], key, i, name));
    return arrays;
  };
  std::vector<py::array> ids = gather("input_ids");
  std::vector<py::array> feats = gather("img_feat");
  std::vector<py::array> locs = gather("img_loc");
  const int64_t dim = feats[0].ndim() == 2 ? feats[0].shape(1) : -1;
  for (size_t i = 0; i < batch; ++i) {
    const py::array& t = ids[i];
    const char kind = kind_of(t);
    if (t.ndim() != 1 || t.shape(0) == 0 || (kind != 'i' && kind != 'u')) {
      value_error(prefix(i) + "input_ids must be a non-empty 1-d integer array, got shape " +
                  shape_str(t) + " dtype " + dtype_str(t));
    }
    check_2d(feats[i], i, "img_feat", -1, dim);
    if (feats[i].shape(0) == 0) value_error(prefix(i) + "img_feat has no regions");
    check_2d(locs[i], i, "img_loc", feats[i].shape(0), kLocDim);
  }
  check_floats(feats, "img_feat");
  for (size_t i = 0; i < batch; ++i) {
    if (!is_float(dtype_of(locs[i]))) {
      type_error(prefix(i) + "img_loc must be float16, float32 or float64 for the C++ packer, got " +
                 dtype_str(locs[i]));
    }
  }

  PackSizes& s = sizes_;
  s.batch = static_cast<int64_t>(batch);
  s.img_dim = dim;
  s.feat_out = output_float(feats);
  examples_.resize(batch);
  keep_.reserve(batch * 5);
  auto keep = [&](const py::array& a) {
    py::array packable = np.packable(a);
    keep_.push_back(packable);
    return static_cast<const void*>(packable.data());
  };
  for (size_t i = 0; i < batch; ++i) {
    ExampleRef& ex = examples_[i];
    ex.txt_len = ids[i].shape(0);
    ex.img_len = feats[i].shape(0);
    ex.input_ids = keep(ids[i]);
    ex.ids_dtype = dtype_of(ids[i]);
    ex.img_feat = keep(feats[i]);
    ex.feat_dtype = dtype_of(feats[i]);
    ex.img_loc = keep(locs[i]);
    ex.loc_dtype = dtype_of(locs[i]);
    const int64_t seq = checked_add(ex.txt_len, ex.img_len, "collate");
    s.txt_rows = checked_add(s.txt_rows, ex.txt_len, "collate");
    s.img_rows = checked_add(s.img_rows, ex.img_len, "collate");
    s.max_seqlen = std::max(s.max_seqlen, seq);
    s.max_txt_len = std::max(s.max_txt_len, ex.txt_len);
    s.max_img_len = std::max(s.max_img_len, ex.img_len);
  }
  s.rows = checked_add(s.txt_rows, s.img_rows, "collate");
  if (s.rows > kInt32Max) {
    value_error("collate: the batch holds " + std::to_string(s.rows) +
                " positions; cu_seqlens is int32, so at most 2147483647");
  }
  const int64_t pad_rows = s.max_seqlen / pad_multiple + (s.max_seqlen % pad_multiple != 0);
  s.pad_len = checked_mul(pad_rows, pad_multiple, "collate: pad_index");
  checked_mul(s.batch, s.pad_len, "collate: pad_index");

  if (task_ == Task::MLM) {
    const py::str key("txt_labels");
    for (size_t i = 0; i < batch; ++i) {
      const py::array labels = np.array(get_field(items[i], key, i, "txt_labels"));
      if (labels.ndim() != 1 || labels.shape(0) != ids[i].shape(0)) {
        value_error(prefix(i) + "txt_labels has shape " + shape_str(labels) + ", input_ids " +
                    shape_str(ids[i]));
      }
      if (!is_integer(dtype_of(labels))) {
        type_error(prefix(i) + "txt_labels must be an integer array for the C++ packer, got " +
                   dtype_str(labels));
      }
      examples_[i].txt_labels = keep(labels);
      examples_[i].labels_dtype = dtype_of(labels);
      s.mlm_targets +=
          count_targets(examples_[i].txt_labels, examples_[i].labels_dtype, ids[i].shape(0));
    }
    if (s.mlm_targets == 0) {
      value_error("collate: MLM batch has no masked token (every txt_labels is -1)");
    }
  }

  if (is_mrm(task_)) {
    const py::str key("img_mask");
    for (size_t i = 0; i < batch; ++i) {
      const py::array mask = np.array(get_field(items[i], key, i, "img_mask"));
      const int64_t n = examples_[i].img_len;
      if (mask.ndim() != 1 || mask.shape(0) != n || dtype_of(mask) != DType::Bool) {
        value_error(prefix(i) + "img_mask must be bool of shape (" + std::to_string(n) +
                    ",), got " + dtype_str(mask) + " " + shape_str(mask));
      }
      const auto* bytes = static_cast<const uint8_t*>(keep(mask));
      examples_[i].img_mask = bytes;
      s.mrm_targets += n - std::count(bytes, bytes + n, uint8_t{0});
    }
    if (s.mrm_targets == 0) value_error("collate: region-masking batch has no masked region");
  }

  if (has_soft_targets(task_)) {
    const py::str key("soft_labels");
    std::vector<py::array> soft(batch);
    for (size_t i = 0; i < batch; ++i) {
      soft[i] = np.array(get_field(items[i], key, i, "soft_labels"));
      check_2d(soft[i], i, "soft_labels", examples_[i].img_len, -1);
    }
    check_floats(soft, "soft_labels");
    s.label_dim = soft[0].shape(1);
    for (size_t i = 0; i < batch; ++i) {
      if (soft[i].shape(1) != s.label_dim) {
        value_error(prefix(i) + "soft_labels has shape " + shape_str(soft[i]) + ", expected (" +
                    std::to_string(examples_[i].img_len) + ", " + std::to_string(s.label_dim) +
                    ") like example 0");
      }
    }
    if (s.label_dim < 2) {
      value_error("collate: soft_labels have " + std::to_string(s.label_dim) +
                  " classes; the MRC label is an argmax over classes 1..C-1, so C must be >= 2");
    }
    s.soft_out = output_float(soft);
    for (size_t i = 0; i < batch; ++i) {
      examples_[i].soft_labels = keep(soft[i]);
      examples_[i].soft_dtype = dtype_of(soft[i]);
    }
  }

  if (task_ == Task::ITM) {
    // np.asarray over the batch's targets, as the oracle's np.array([...]): Python ints, bools
    // and NumPy scalars all land in one integer array.
    const py::str key("itm_target");
    py::list values(batch);
    for (size_t i = 0; i < batch; ++i) values[i] = get_field(items[i], key, i, "itm_target");
    const py::array targets = np.packable(np.array(values));
    const DType t = dtype_of(targets);
    bool ok = (t == DType::Bool || is_integer(t)) && targets.ndim() == 1 &&
              targets.shape(0) == static_cast<py::ssize_t>(batch);
    for (size_t i = 0; ok && i < batch; ++i) {
      int64_t v = 0;
      if (t == DType::Bool) {
        v = static_cast<const uint8_t*>(targets.data())[i] != 0;
      } else {
        with_int_type(t, [&](auto tag) {
          using T = decltype(tag);
          const T raw = static_cast<const T*>(targets.data())[i];
          v = raw == 0 ? 0 : raw == 1 ? 1 : -1;
        });
      }
      ok = v == 0 || v == 1;
      examples_[i].itm_target = v;
    }
    if (!ok) {
      value_error("collate: itm_target must be 0 or 1, got " +
                  py::str(targets.attr("tolist")()).cast<std::string>());
    }
  }
}

std::vector<OutputSpec> PackPlan::output_specs() const {
  const PackSizes& s = sizes_;
  std::vector<OutputSpec> specs = {
      {"input_ids", {s.txt_rows}, DType::I64},
      {"txt_pos", {s.txt_rows}, DType::I64},
      {"txt_dest", {s.txt_rows}, DType::I64},
      {"img_feat", {s.img_rows, s.img_dim}, s.feat_out},
      {"img_loc", {s.img_rows, kLocDim}, DType::F32},
      {"img_masked", {s.img_rows}, DType::Bool},
      {"img_dest", {s.img_rows}, DType::I64},
      {"cu_seqlens", {s.batch + 1}, DType::I32},
      {"txt_len", {s.batch}, DType::I64},
      {"img_len", {s.batch}, DType::I64},
      {"pad_index", {s.batch, s.pad_len}, DType::I64},
      {"unpad_index", {s.rows}, DType::I64},
  };
  if (task_ == Task::MLM) {
    specs.push_back({"mlm_index", {s.mlm_targets}, DType::I64});
    specs.push_back({"mlm_labels", {s.mlm_targets}, DType::I64});
  }
  if (is_mrm(task_)) specs.push_back({"mrm_index", {s.mrm_targets}, DType::I64});
  if (task_ == Task::MRFR) {
    specs.push_back({"mrfr_target", {s.mrm_targets, s.img_dim}, s.feat_out});
  }
  if (has_soft_targets(task_)) {
    specs.push_back({"mrc_soft_target", {s.mrm_targets, s.label_dim}, s.soft_out});
    specs.push_back({"mrc_label", {s.mrm_targets}, DType::I64});
  }
  if (task_ == Task::ITM) specs.push_back({"itm_target", {s.batch}, DType::I64});
  return specs;
}

py::list PackPlan::outputs() const {
  py::list out;
  for (const OutputSpec& spec : output_specs()) {
    py::tuple shape(spec.shape.size());
    for (size_t d = 0; d < spec.shape.size(); ++d) shape[d] = spec.shape[d];
    out.append(py::make_tuple(spec.name, shape, dtype_name(spec.dtype)));
  }
  return out;
}

py::dict PackPlan::scalars() const {
  py::dict out;
  out["max_seqlen"] = sizes_.max_seqlen;
  out["max_txt_len"] = sizes_.max_txt_len;
  out["max_img_len"] = sizes_.max_img_len;
  return out;
}

void PackPlan::pack_into(const py::dict& out) const {
  std::unordered_map<std::string, void*> ptrs;
  std::vector<py::array> held;  // the outputs stay referenced while the GIL is released
  for (const OutputSpec& spec : output_specs()) {
    const py::str key(spec.name);
    if (!out.contains(key)) {
      value_error(std::string("pack_into: missing output '") + spec.name + "'");
    }
    const py::object obj = out[key];
    if (!py::isinstance<py::array>(obj)) {
      type_error(std::string("pack_into: output '") + spec.name + "' must be a NumPy array, got " +
                 py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
    }
    auto a = obj.cast<py::array>();
    bool ok = dtype_of(a) == spec.dtype && native_byte_order(a) &&
              a.ndim() == static_cast<py::ssize_t>(spec.shape.size()) && a.writeable() &&
              (a.flags() & py::array::c_style) && (a.flags() & kNpyAligned);
    for (size_t d = 0; ok && d < spec.shape.size(); ++d) ok = a.shape(d) == spec.shape[d];
    if (!ok) {
      value_error(std::string("pack_into: output '") + spec.name +
                  "' must be a writeable, C-contiguous, aligned " + dtype_name(spec.dtype) +
                  " array of shape " + shape_str(spec.shape, spec.shape.size()) + ", got " +
                  dtype_str(a) + " " + shape_str(a) + (a.writeable() ? "" : " (read-only)"));
    }
    ptrs[spec.name] = a.mutable_data();
    held.push_back(a);
  }
  auto get = [&](const char* name) {
    const auto it = ptrs.find(name);
    return it == ptrs.end() ? nullptr : it->second;
  };
  PackOutputs o;
  o.input_ids = static_cast<int64_t*>(get("input_ids"));
  o.txt_pos = static_cast<int64_t*>(get("txt_pos"));
  o.txt_dest = static_cast<int64_t*>(get("txt_dest"));
  o.img_feat = get("img_feat");
  o.img_loc = static_cast<float*>(get("img_loc"));
  o.img_masked = static_cast<uint8_t*>(get("img_masked"));
  o.img_dest = static_cast<int64_t*>(get("img_dest"));
  o.cu_seqlens = static_cast<int32_t*>(get("cu_seqlens"));
  o.txt_len = static_cast<int64_t*>(get("txt_len"));
  o.img_len = static_cast<int64_t*>(get("img_len"));
  o.pad_index = static_cast<int64_t*>(get("pad_index"));
  o.unpad_index = static_cast<int64_t*>(get("unpad_index"));
  o.mlm_index = static_cast<int64_t*>(get("mlm_index"));
  o.mlm_labels = static_cast<int64_t*>(get("mlm_labels"));
  o.mrm_index = static_cast<int64_t*>(get("mrm_index"));
  o.mrfr_target = get("mrfr_target");
  o.mrc_soft_target = get("mrc_soft_target");
  o.mrc_label = static_cast<int64_t*>(get("mrc_label"));
  o.itm_target = static_cast<int64_t*>(get("itm_target"));

  py::gil_scoped_release release;
  pack_examples(task_, examples_, sizes_, o);
}

}  // namespace uniter_fast
