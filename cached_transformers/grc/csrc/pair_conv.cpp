// The GRC positional conv on CPU: a 3x3 convolution, padding 1, whose groups hold two channels
// (weight C x 2 x 3 x 3, groups C / 2), on channels-last B x H x W x C tensors, forward and backward,
// each in one pass over the activations. Built on first use by cached_transformers/grc/native.py.
//
// With t the tap (dy, dx) and d_t its offset, output channel c = 2g + o reads input channels 2g and
// 2g + 1, i.e. c itself and its partner c ^ 1:
//     out(p)[c] = bias[c] + sum_t  ws[t][c] * in(p + d_t)[c]  +  wx[t][c] * in(p + d_t)[c ^ 1]
// with ws[t][c] = W[c][c & 1][t] ("same") and wx[t][c] = W[c][(c & 1) ^ 1][t] ("cross"). A block of
// channels that starts at an even channel holds whole pairs, so "c ^ 1" is a fixed in-register swap of
// neighbouring lanes and every tap is two multiply-adds on full vectors.
// Backward:  grad_in(q) = sum_t ws[-t] * go(q + d_t) + swap(wx[-t] * go(q + d_t))
//            gW_same[t] = sum_p go(p) * in(p + d_t),  gW_cross[t] = sum_p go(p) * swap(in(p + d_t)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint32 __attribute__((vector_size(64)));
typedef double vdouble __attribute__((vector_size(64)));
typedef int64_t vint64 __attribute__((vector_size(64)));

template <typename T> struct Vec;
template <> struct Vec<float> {
  using type = vfloat;
  static constexpr int lanes = 16;
  static inline vfloat swap(vfloat v) {
    const vint32 m = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    return __builtin_shuffle(v, m);
  }
};
template <> struct Vec<double> {
  using type = vdouble;
  static constexpr int lanes = 8;
  static inline vdouble swap(vdouble v) {
    const vint64 m = {1, 0, 3, 2, 5, 4, 7, 6};
    return __builtin_shuffle(v, m);
  }
};

template <typename T> inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T> inline void store(T* p, typename Vec<T>::type v) { std::memcpy(p, &v, sizeof(v)); }

// weight C x 2 x 3 x 3 -> ws, wx, each 9 x C (tap-major, so a channel block of one tap is contiguous)
template <typename T> void split_weight(const T* w, int64_t C, T* ws, T* wx) {
  for (int64_t c = 0; c < C; ++c)
    for (int t = 0; t < 9; ++t) {
      ws[t * C + c] = w[(c * 2 + (c & 1)) * 9 + t];
      wx[t * C + c] = w[(c * 2 + ((c & 1) ^ 1)) * 9 + t];
    }
}

// the 9 taps' same / cross weights of the channel block starting at c0, into registers
template <typename T, typename V>
inline void load_taps(const T* ws, const T* wx, int64_t C, int64_t c0, V* vs, V* vx) {
  for (int t = 0; t < 9; ++t) {
    vs[t] = load(ws + t * C + c0);
    vx[t] = load(wx + t * C + c0);
  }
}

template <typename T>
void forward_kernel(const T* in, const T* ws, const T* wx, const T* bias, T* out,
                    int64_t B, int64_t H, int64_t W, int64_t C) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::lanes;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      const int64_t y0 = y > 0 ? -1 : 0, y1 = y < H - 1 ? 1 : 0;
      const T* in_row = in + (b * H + y) * W * C;
      T* out_row = out + (b * H + y) * W * C;
      int64_t c0 = 0;
      for (; c0 + N <= C; c0 += N) {
        V vs[9], vx[9];
        load_taps(ws, wx, C, c0, vs, vx);
        const V vb = bias ? load(bias + c0) : V{};
        for (int64_t x = 0; x < W; ++x) {
          const int64_t x0 = x > 0 ? -1 : 0, x1 = x < W - 1 ? 1 : 0;
          const T* centre = in_row + x * C + c0;
          V acc = vb;
          for (int64_t dy = y0; dy <= y1; ++dy)
            for (int64_t dx = x0; dx <= x1; ++dx) {
              const int t = (dy + 1) * 3 + dx + 1;
              const V i = load(centre + (dy * W + dx) * C);
              acc += vs[t] * i + vx[t] * Vec<T>::swap(i);
            }
          store(out_row + x * C + c0, acc);
        }
      }
      for (int64_t c = c0; c < C; ++c)  // channels after the last full block (C is even: whole pairs)
        for (int64_t x = 0; x < W; ++x) {
          T acc = bias ? bias[c] : T(0);
          for (int64_t dy = y0; dy <= y1; ++dy)
            for (int64_t dx = (x > 0 ? -1 : 0); dx <= (x < W - 1 ? 1 : 0); ++dx) {
              const int t = (dy + 1) * 3 + dx + 1;
              const T* i = in_row + (x + dy * W + dx) * C;
              acc += ws[t * C + c] * i[c] + wx[t * C + c] * i[c ^ 1];
            }
          out_row[x * C + c] = acc;
        }
    }
  });
}

// gacc: n_chunks x 19 x C zeros; rows 0-8 gW_same, 9-17 gW_cross, 18 the bias gradient
template <typename T>
void backward_kernel(const T* go, const T* in, const T* ws, const T* wx, T* gi, T* gacc, int64_t n_chunks,
                     int64_t B, int64_t H, int64_t W, int64_t C) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::lanes;
  // chunk k of the rows sums into gacc[k]: the partial sums do not depend on which thread ran which chunk
  const int64_t rows = B * H, chunks = std::min<int64_t>(n_chunks, rows);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
   for (int64_t k = first; k < last; ++k) {
    T* acc = gacc + k * 19 * C;
    for (int64_t row = rows * k / chunks; row < rows * (k + 1) / chunks; ++row) {
      const int64_t b = row / H, y = row % H;
      const int64_t y0 = y > 0 ? -1 : 0, y1 = y < H - 1 ? 1 : 0;
      const int64_t base = (b * H + y) * W * C;
      int64_t c0 = 0;
      for (; c0 + N <= C; c0 += N) {
        V vs[9], vx[9];
        load_taps(ws, wx, C, c0, vs, vx);
        for (int64_t x = 0; x < W; ++x) {  // input gradient: in(q) fed out(q + d) through the tap of -d
          const int64_t x0 = x > 0 ? -1 : 0, x1 = x < W - 1 ? 1 : 0;
          const int64_t q = base + x * C + c0;
          V same = V{}, cross = V{};
          for (int64_t dy = y0; dy <= y1; ++dy)
            for (int64_t dx = x0; dx <= x1; ++dx) {
              const int t = (1 - dy) * 3 + 1 - dx;
              const V g = load(go + q + (dy * W + dx) * C);
              same += vs[t] * g;
              cross += vx[t] * g;
            }
          store(gi + q, same + Vec<T>::swap(cross));
        }
        V gs[9], gx[9], gb = V{};
        for (int t = 0; t < 9; ++t) gs[t] = gx[t] = V{};
        for (int64_t x = 0; x < W; ++x) {  // weight and bias gradients
          const int64_t x0 = x > 0 ? -1 : 0, x1 = x < W - 1 ? 1 : 0;
          const int64_t p = base + x * C + c0;
          const V g = load(go + p);
          gb += g;
          for (int64_t dy = y0; dy <= y1; ++dy)
            for (int64_t dx = x0; dx <= x1; ++dx) {
              const int t = (dy + 1) * 3 + dx + 1;
              const V i = load(in + p + (dy * W + dx) * C);
              gs[t] += g * i;
              gx[t] += g * Vec<T>::swap(i);
            }
        }
        for (int t = 0; t < 9; ++t) {
          store(acc + t * C + c0, load(acc + t * C + c0) + gs[t]);
          store(acc + (9 + t) * C + c0, load(acc + (9 + t) * C + c0) + gx[t]);
        }
        store(acc + 18 * C + c0, load(acc + 18 * C + c0) + gb);
      }
      for (int64_t c = c0; c < C; ++c)
        for (int64_t x = 0; x < W; ++x) {
          const int64_t p = base + x * C;
          const T g = go[p + c];
          T grad_in = 0;
          acc[18 * C + c] += g;
          for (int64_t dy = y0; dy <= y1; ++dy)
            for (int64_t dx = (x > 0 ? -1 : 0); dx <= (x < W - 1 ? 1 : 0); ++dx) {
              const int t = (dy + 1) * 3 + dx + 1, mirrored = 8 - t;
              const int64_t off = (dy * W + dx) * C;
              acc[t * C + c] += g * in[p + off + c];
              acc[(9 + t) * C + c] += g * in[p + off + (c ^ 1)];
              grad_in += ws[mirrored * C + c] * go[p + off + c] + wx[mirrored * C + (c ^ 1)] * go[p + off + (c ^ 1)];
            }
          gi[p + c] = grad_in;
        }
    }
   }
  });
}

void check(const at::Tensor& grid, const at::Tensor& weight) {
  TORCH_CHECK(grid.device().is_cpu() && weight.device().is_cpu(), "pair_conv3x3 (native): CPU tensors only.");
  TORCH_CHECK(grid.dim() == 4, "pair_conv3x3 (native): the input must be B x H x W x C.");
  const int64_t C = grid.size(3);
  TORCH_CHECK(C % 2 == 0 && weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 2 &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              "pair_conv3x3 (native): the weight must be C x 2 x 3 x 3 for an input of C = ", C, " channels.");
  TORCH_CHECK(grid.scalar_type() == weight.scalar_type(), "pair_conv3x3 (native): input and weight dtypes differ.");
}

at::Tensor pair_conv3x3_forward(const at::Tensor& grid_in, const at::Tensor& weight_in,
                                const c10::optional<at::Tensor>& bias_in) {
  check(grid_in, weight_in);
  const at::Tensor grid = grid_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t B = grid.size(0), H = grid.size(1), W = grid.size(2), C = grid.size(3);
  at::Tensor out = at::empty_like(grid);
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "pair_conv3x3_forward", [&] {
    std::vector<scalar_t> ws(9 * C), wx(9 * C);
    split_weight(weight.data_ptr<scalar_t>(), C, ws.data(), wx.data());
    forward_kernel<scalar_t>(grid.data_ptr<scalar_t>(), ws.data(), wx.data(),
                             bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), B, H, W, C);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_conv3x3_backward(const at::Tensor& grad_in,
                                                                     const at::Tensor& grid_in,
                                                                     const at::Tensor& weight_in) {
  check(grid_in, weight_in);
  TORCH_CHECK(grad_in.sizes() == grid_in.sizes(), "pair_conv3x3 (native): the gradient's shape differs from the input's.");
  const at::Tensor grad = grad_in.to(grid_in.scalar_type()).contiguous(), grid = grid_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t B = grid.size(0), H = grid.size(1), W = grid.size(2), C = grid.size(3);
  at::Tensor grad_grid = at::empty_like(grid);
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B * H));
  at::Tensor gacc = at::zeros({n_chunks, 19, C}, grid.options());
  at::Tensor grad_weight = at::empty({C, 2, 3, 3}, grid.options());
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "pair_conv3x3_backward", [&] {
    std::vector<scalar_t> ws(9 * C), wx(9 * C);
    split_weight(weight.data_ptr<scalar_t>(), C, ws.data(), wx.data());
    backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), grid.data_ptr<scalar_t>(), ws.data(), wx.data(),
                              grad_grid.data_ptr<scalar_t>(), gacc.data_ptr<scalar_t>(), n_chunks, B, H, W, C);
  });
  const at::Tensor total = gacc.sum(0);  // 19 x C, the threads' partial sums in a fixed order
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "pair_conv3x3_backward_weight", [&] {
    const scalar_t* s = total.data_ptr<scalar_t>();
    scalar_t* gw = grad_weight.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c)
      for (int t = 0; t < 9; ++t) {
        gw[(c * 2 + (c & 1)) * 9 + t] = s[t * C + c];
        gw[(c * 2 + ((c & 1) ^ 1)) * 9 + t] = s[(9 + t) * C + c];
      }
  });
  return {grad_grid, grad_weight, total[18].clone()};
}

}  // namespace

TORCH_LIBRARY(cached_transformers_cpu, m) {
  m.def("pair_conv3x3_forward(Tensor grid, Tensor weight, Tensor? bias) -> Tensor");
  m.def("pair_conv3x3_backward(Tensor grad, Tensor grid, Tensor weight) -> (Tensor, Tensor, Tensor)");
  m.impl("pair_conv3x3_forward", c10::DispatchKey::CPU, TORCH_FN(pair_conv3x3_forward));
  m.impl("pair_conv3x3_backward", c10::DispatchKey::CPU, TORCH_FN(pair_conv3x3_backward));
}
