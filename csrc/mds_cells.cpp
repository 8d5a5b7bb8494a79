// Python module data_prep._mds_cells: packs a CSR block's cells into mosaicml-streaming MDS sample bytes.
//
// Used by data_prep.mds.CellMDSWriter.write_cells (which documents the layout and checks the first sample of
// every writer against streaming's own encoder). Per cell i, with n = ends[i] - starts[i] > 0:
//   u32 size(counts) | u32 size(genes) | i64 cell_id | i64 cell_type                 (fixed header)
//   u8 counts dtype code | shape(n) | counts[starts[i]:ends[i]] as that dtype         (counts column)
//   i64 dataset | i64 donor                                                          (fixed middle)
//   shape(n) | genes[starts[i]:ends[i]]                                              (genes column)
// where shape(n) = (shape dtype code, n) with n as u8 / u16 / u32: the smallest that holds it.
// It replaces a Python loop of one join per cell (~4 µs each) with one memcpy pass (~0.3 µs per cell).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

using Index = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

struct Bytes {
  const char* ptr = nullptr;
  size_t size = 0;
  size_t itemsize = 0;
};

Bytes contiguous(const py::buffer& b, const char* what) {
  py::buffer_info info = b.request();
  if (info.ndim != 1 || (info.ndim == 1 && info.strides[0] != info.itemsize)) {
    throw std::invalid_argument(std::string(what) + " must be a contiguous 1-D array");
  }
  return {static_cast<const char*>(info.ptr), static_cast<size_t>(info.size * info.itemsize),
          static_cast<size_t>(info.itemsize)};
}

template <typename T>
char* put(char* out, T value) {
  std::memcpy(out, &value, sizeof(T));
  return out + sizeof(T);
}

// shape(n): the NDArray shape header of a 1-D array of length n (codes: shape dtype code | ndim << 2).
char* put_shape(char* out, uint64_t n, const std::array<uint8_t, 3>& codes) {
  if (n < (1u << 8)) {
    out = put<uint8_t>(out, codes[0]);
    return put<uint8_t>(out, static_cast<uint8_t>(n));
  }
  if (n < (1u << 16)) {
    out = put<uint8_t>(out, codes[1]);
    return put<uint16_t>(out, static_cast<uint16_t>(n));
  }
  out = put<uint8_t>(out, codes[2]);
  return put<uint32_t>(out, static_cast<uint32_t>(n));
}

size_t shape_size(uint64_t n) { return n < (1u << 8) ? 2 : n < (1u << 16) ? 3 : 5; }

// counts: a list of three buffers (None where no cell uses that dtype): the block's counts as uint8, uint16,
// uint32. count_codes / shape_codes: streaming's dtype codes for those three dtypes and the three shape headers.
py::list pack_cells(const py::buffer& genes, const py::list& counts, const Index& starts, const Index& ends,
                    const Index& kinds, const Index& cell_ids, const Index& cell_types, const Index& donors,
                    int64_t dataset, const std::array<uint8_t, 3>& count_codes,
                    const std::array<uint8_t, 3>& shape_codes) {
  const Bytes g = contiguous(genes, "genes");
  if (counts.size() != 3) throw std::invalid_argument("counts must list 3 buffers (uint8, uint16, uint32) or None");
  std::array<Bytes, 3> c{};
  for (size_t k = 0; k < 3; ++k) {
    if (!counts[k].is_none()) {
      c[k] = contiguous(counts[k].cast<py::buffer>(), "counts");
      if (c[k].itemsize != (size_t{1} << k)) throw std::invalid_argument("counts[k] must have itemsize 2**k");
    }
  }
  const py::ssize_t m = starts.size();
  for (const Index* a : {&ends, &kinds, &cell_ids, &cell_types, &donors}) {
    if (a->ndim() != 1 || a->size() != m) throw std::invalid_argument("per-cell arrays must all have one length");
  }
  const int64_t *s = starts.data(), *e = ends.data(), *kind = kinds.data(), *cid = cell_ids.data(),
                *ct = cell_types.data(), *dn = donors.data();
  const size_t n_genes = g.itemsize ? g.size / g.itemsize : 0;
  py::list out(m);
  for (py::ssize_t i = 0; i < m; ++i) {
    const int64_t k = kind[i];
    if (k < 0 || k > 2 || c[k].ptr == nullptr) throw std::invalid_argument("cell kind without its counts buffer");
    if (s[i] < 0 || e[i] <= s[i] || static_cast<size_t>(e[i]) > n_genes ||
        static_cast<size_t>(e[i]) > c[k].size / c[k].itemsize) {
      throw std::invalid_argument("cell slice is empty or outside the block");
    }
    const uint64_t n = static_cast<uint64_t>(e[i] - s[i]);
    const size_t sh = shape_size(n), cb = n * c[k].itemsize, gb = n * g.itemsize;
    const size_t c_size = 1 + sh + cb, g_size = sh + gb;
    const size_t total = 24 + c_size + 16 + g_size;
    PyObject* obj = PyBytes_FromStringAndSize(nullptr, static_cast<py::ssize_t>(total));
    if (obj == nullptr) throw py::error_already_set();
    char* p = PyBytes_AS_STRING(obj);
    p = put<uint32_t>(p, static_cast<uint32_t>(c_size));
    p = put<uint32_t>(p, static_cast<uint32_t>(g_size));
    p = put<int64_t>(p, cid[i]);
    p = put<int64_t>(p, ct[i]);
    p = put<uint8_t>(p, count_codes[k]);
    p = put_shape(p, n, shape_codes);
    std::memcpy(p, c[k].ptr + s[i] * c[k].itemsize, cb);
    p += cb;
    p = put<int64_t>(p, dataset);
    p = put<int64_t>(p, dn[i]);
    p = put_shape(p, n, shape_codes);
    std::memcpy(p, g.ptr + s[i] * g.itemsize, gb);
    PyList_SET_ITEM(out.ptr(), i, obj);  // steals the reference
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "MDS sample packing for data_prep (see data_prep.mds.CellMDSWriter.write_cells)";
  m.def("pack_cells", &pack_cells, py::arg("genes"), py::arg("counts"), py::arg("starts"), py::arg("ends"),
        py::arg("kinds"), py::arg("cell_ids"), py::arg("cell_types"), py::arg("donors"), py::arg("dataset"),
        py::arg("count_codes"), py::arg("shape_codes"),
        "Per cell, the MDS sample bytes of genes[starts[i]:ends[i]] and its counts (one bytes object per cell)");
}
