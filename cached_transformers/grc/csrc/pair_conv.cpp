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

// one output row y of an H x W x C image (in_row, out_row: row y's start); not inlined into its callers, so
// every caller runs the same machine code whatever it does around it
template <typename T>
__attribute__((noinline)) void conv_row(const T* in_row, const T* ws, const T* wx, const T* bias, T* out_row,
                                        int64_t y, int64_t H, int64_t W, int64_t C) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::lanes;
  const int64_t y0 = y > 0 ? -1 : 0, y1 = y < H - 1 ? 1 : 0;
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

// in / out: B images of H x W x C whose starts lie in_bs / out_bs elements apart (a token sequence's grid
// part after its prefix tokens); epilogue(b, y, out_row) runs on each finished output row
template <typename T, typename Epilogue>
void forward_kernel(const T* in, int64_t in_bs, const T* ws, const T* wx, const T* bias, T* out, int64_t out_bs,
                    int64_t B, int64_t H, int64_t W, int64_t C, const Epilogue& epilogue) {
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      T* out_row = out + b * out_bs + y * W * C;
      conv_row(in + b * in_bs + y * W * C, ws, wx, bias, out_row, y, H, W, C);
      epilogue(b, y, out_row);
    }
  });
}

// gacc: n_chunks x 19 x C zeros; rows 0-8 gW_same, 9-17 gW_cross, 18 the bias gradient. go, in and gi hold
// B images each, bs elements apart (as in forward_kernel)
template <typename T>
void backward_kernel(const T* go, const T* in, const T* ws, const T* wx, T* gi, T* gacc, int64_t n_chunks,
                     int64_t bs, int64_t B, int64_t H, int64_t W, int64_t C) {
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
      const int64_t base = b * bs + y * W * C;
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

// The conv's input gradient into gi (B images bs elements apart, like go and in) and its weight and bias
// gradients, from the threads' partial sums added in a fixed order.
template <typename T>
std::tuple<at::Tensor, at::Tensor> conv_backward(const T* go, const T* in, const at::Tensor& weight, T* gi,
                                                 int64_t bs, int64_t B, int64_t H, int64_t W, int64_t C) {
  const at::TensorOptions options = weight.options();
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B * H));
  at::Tensor gacc = at::zeros({n_chunks, 19, C}, options);
  std::vector<T> ws(9 * C), wx(9 * C);
  split_weight(weight.data_ptr<T>(), C, ws.data(), wx.data());
  backward_kernel<T>(go, in, ws.data(), wx.data(), gi, gacc.data_ptr<T>(), n_chunks, bs, B, H, W, C);
  const at::Tensor total = gacc.sum(0);  // 19 x C
  at::Tensor grad_weight = at::empty({C, 2, 3, 3}, options);
  const T* sums = total.data_ptr<T>();
  T* gw = grad_weight.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c)
    for (int t = 0; t < 9; ++t) {
      gw[(c * 2 + (c & 1)) * 9 + t] = sums[t * C + c];
      gw[(c * 2 + ((c & 1) ^ 1)) * 9 + t] = sums[(9 + t) * C + c];
    }
  return {grad_weight, total[18].clone()};
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
    forward_kernel<scalar_t>(grid.data_ptr<scalar_t>(), H * W * C, ws.data(), wx.data(),
                             bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                             H * W * C, B, H, W, C, [](int64_t, int64_t, scalar_t*) {});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_conv3x3_backward(const at::Tensor& grad_in,
                                                                     const at::Tensor& grid_in,
                                                                     const at::Tensor& weight_in) {
  check(grid_in, weight_in);
  TORCH_CHECK(grad_in.sizes() == grid_in.sizes(), "pair_conv3x3 (native): the gradient's shape differs from the input's.");
  const at::Tensor grad = grad_in.to(grid_in.scalar_type()).contiguous(), grid = grid_in.contiguous();
  const int64_t B = grid.size(0), H = grid.size(1), W = grid.size(2), C = grid.size(3);
  at::Tensor grad_grid = at::empty_like(grid), grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "pair_conv3x3_backward", [&] {
    std::tie(grad_weight, grad_bias) = conv_backward<scalar_t>(
        grad.data_ptr<scalar_t>(), grid.data_ptr<scalar_t>(), weight_in.contiguous(), grad_grid.data_ptr<scalar_t>(),
        H * W * C, B, H, W, C);
  });
  return {grad_grid, grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------------------------------------
// The layer's output in one pass: the lambda mix of the two branches plus the positional conv,
//     out[b, t, c] = (1 - a_h) s[b, t, c] + [j < D_m/H] a_h m[b, t, h D_m/H + j] + [t >= P] conv(x)[b, t - P, c]
// for channel c = h (C/H) + j of head h, tokens t of which the first P are prefix (class) tokens and the rest
// the H x W grid of x. Backward: ds = (1 - a) g, dm = a g (mixed channels), da_h = sum(g m) - sum(g s) over
// the head's channels, and the conv's backward on g's grid tokens.

struct MixShape {
  int64_t B, T, C, Dm, heads, P, H, W;
  int64_t hd() const { return C / heads; }
  int64_t md() const { return Dm / heads; }
};

MixShape mix_shape(const at::Tensor& s, const at::Tensor& m, const at::Tensor& alpha, const at::Tensor& x,
                   const at::Tensor& weight, int64_t H, int64_t W) {
  TORCH_CHECK(s.dim() == 3 && m.dim() == 3 && alpha.dim() == 1 && x.sizes() == s.sizes(),
              "mix_pos (native): s and x must be B x T x C, m B x T x D_m and alpha one value per head.");
  const MixShape shape{s.size(0), s.size(1), s.size(2), m.size(2), alpha.size(0), s.size(1) - H * W, H, W};
  TORCH_CHECK(m.size(0) == shape.B && m.size(1) == shape.T && shape.C % shape.heads == 0 &&
                  shape.Dm % shape.heads == 0 && shape.md() <= shape.hd() && shape.P >= 0,
              "mix_pos (native): shapes of s, m, alpha and the ", H, "x", W, " grid do not fit together.");
  TORCH_CHECK(s.scalar_type() == m.scalar_type() && s.scalar_type() == alpha.scalar_type() &&
                  s.scalar_type() == x.scalar_type(), "mix_pos (native): s, m, alpha and x must share one dtype.");
  check(x.view({shape.B, shape.T, 1, shape.C}), weight);
  return shape;
}

// What the mix does to each channel, worked out once per call (no divisions per token): keep[c] = 1 - a_h; and
// per vector block of channels the offset of its m values (-1: not mixed) and a_h. The block path needs every
// head's width and mixed width to be multiples of the vector width (true of all of the paper's models).
template <typename T> struct MixPlan {
  int64_t C, Dm, heads, hd, md;
  bool blocks;
  std::vector<T> keep, alpha, block_alpha;
  std::vector<int64_t> block_m;
  MixPlan(const MixShape& sh, const T* a) : C(sh.C), Dm(sh.Dm), heads(sh.heads), hd(sh.hd()), md(sh.md()),
      alpha(a, a + sh.heads) {
    constexpr int N = Vec<T>::lanes;
    blocks = hd % N == 0 && md % N == 0;
    for (int64_t c = 0; c < C; ++c) keep.push_back(T(1) - a[c / hd]);
    for (int64_t c0 = 0; blocks && c0 < C; c0 += N) {
      const int64_t h = c0 / hd, j = c0 % hd;
      block_m.push_back(j < md ? h * md + j : -1);
      block_alpha.push_back(a[h]);
    }
  }
};

// the mix of one token added to out (which holds the conv's value, or zeros)
template <typename T>
inline void mix_token(T* out, const T* s, const T* m, const MixPlan<T>& plan) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::lanes;
  const T* keep = plan.keep.data();
  if (plan.blocks) {
    for (int64_t c0 = 0, i = 0; c0 < plan.C; c0 += N, ++i) {
      V o = load(out + c0) + load(keep + c0) * load(s + c0);
      if (plan.block_m[i] >= 0) o += plan.block_alpha[i] * load(m + plan.block_m[i]);
      store(out + c0, o);
    }
    return;
  }
  for (int64_t c = 0; c < plan.C; ++c) out[c] += keep[c] * s[c];
  for (int64_t h = 0; h < plan.heads; ++h)
    for (int64_t j = 0; j < plan.md; ++j) out[h * plan.hd + j] += plan.alpha[h] * m[h * plan.md + j];
}

// one token's backward: gs = keep g, gm = a g on the mixed channels, and the sums of g s and g m added to as, am
template <typename T>
inline void mix_token_backward(const T* g, const T* s, const T* m, const MixPlan<T>& plan, T* gs, T* gm, T* as, T* am) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::lanes;
  const T* keep = plan.keep.data();
  if (plan.blocks) {
    for (int64_t c0 = 0, i = 0; c0 < plan.C; c0 += N, ++i) {
      const V gv = load(g + c0);
      store(gs + c0, load(keep + c0) * gv);
      store(as + c0, load(as + c0) + gv * load(s + c0));
      const int64_t k = plan.block_m[i];
      if (k >= 0) {
        store(gm + k, plan.block_alpha[i] * gv);
        store(am + k, load(am + k) + gv * load(m + k));
      }
    }
    return;
  }
  for (int64_t c = 0; c < plan.C; ++c) {
    gs[c] = keep[c] * g[c];
    as[c] += g[c] * s[c];
  }
  for (int64_t h = 0; h < plan.heads; ++h)
    for (int64_t j = 0; j < plan.md; ++j) {
      const int64_t k = h * plan.md + j;
      gm[k] = plan.alpha[h] * g[h * plan.hd + j];
      am[k] += g[h * plan.hd + j] * m[k];
    }
}

at::Tensor mix_pos_forward(const at::Tensor& s_in, const at::Tensor& m_in, const at::Tensor& alpha_in,
                           const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
                           int64_t H, int64_t W) {
  const MixShape sh = mix_shape(s_in, m_in, alpha_in, x_in, weight_in, H, W);
  const at::Tensor s = s_in.contiguous(), m = m_in.contiguous(), alpha = alpha_in.contiguous(), x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(s);
  const int64_t C = sh.C, T_ = sh.T, P = sh.P;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "mix_pos_forward", [&] {
    const scalar_t *sp = s.data_ptr<scalar_t>(), *mp = m.data_ptr<scalar_t>(), *ap = alpha.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const MixPlan<scalar_t> plan(sh, ap);
    std::vector<scalar_t> ws(9 * C), wx(9 * C);
    for (int64_t b = 0; b < sh.B; ++b)  // prefix tokens: the mix alone
      for (int64_t t = 0; t < P; ++t) {
        const int64_t k = b * T_ + t;
        std::fill(op + k * C, op + (k + 1) * C, scalar_t(0));
        mix_token(op + k * C, sp + k * C, mp + k * sh.Dm, plan);
      }
    split_weight(weight.data_ptr<scalar_t>(), C, ws.data(), wx.data());
    forward_kernel<scalar_t>(
        x.data_ptr<scalar_t>() + P * C, T_ * C, ws.data(), wx.data(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
        op + P * C, T_ * C, sh.B, H, W, C, [&](int64_t b, int64_t y, scalar_t* out_row) {
          for (int64_t i = 0; i < W; ++i) {
            const int64_t k = b * T_ + P + y * W + i;
            mix_token(out_row + i * C, sp + k * C, mp + k * sh.Dm, plan);
          }
        });
  });
  return out;
}

std::vector<at::Tensor> mix_pos_backward(const at::Tensor& grad_in, const at::Tensor& s_in, const at::Tensor& m_in,
                                         const at::Tensor& alpha_in, const at::Tensor& x_in, const at::Tensor& weight_in,
                                         int64_t H, int64_t W) {
  const MixShape sh = mix_shape(s_in, m_in, alpha_in, x_in, weight_in, H, W);
  TORCH_CHECK(grad_in.sizes() == s_in.sizes(), "mix_pos (native): the gradient's shape differs from the output's.");
  const at::Tensor grad = grad_in.to(s_in.scalar_type()).contiguous();
  const at::Tensor s = s_in.contiguous(), m = m_in.contiguous(), alpha = alpha_in.contiguous(), x = x_in.contiguous();
  const int64_t C = sh.C, Dm = sh.Dm, T_ = sh.T, P = sh.P, hd = sh.hd(), md = sh.md(), tokens = sh.B * sh.T;
  at::Tensor gs = at::empty_like(s), gm = at::empty_like(m), gx = at::empty_like(x), grad_weight, grad_bias;
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tokens));
  at::Tensor acc = at::zeros({n_chunks, C + Dm}, s.options());  // per chunk: sum g s (C), sum g m (D_m)
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "mix_pos_backward", [&] {
    const scalar_t *g = grad.data_ptr<scalar_t>(), *sp = s.data_ptr<scalar_t>(), *mp = m.data_ptr<scalar_t>();
    const scalar_t* ap = alpha.data_ptr<scalar_t>();
    scalar_t *gsp = gs.data_ptr<scalar_t>(), *gmp = gm.data_ptr<scalar_t>(), *gxp = gx.data_ptr<scalar_t>();
    const MixPlan<scalar_t> plan(sh, ap);
    at::parallel_for(0, n_chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        scalar_t* as = acc.data_ptr<scalar_t>() + k * (C + Dm);
        scalar_t* am = as + C;
        for (int64_t i = tokens * k / n_chunks; i < tokens * (k + 1) / n_chunks; ++i)
          mix_token_backward(g + i * C, sp + i * C, mp + i * Dm, plan, gsp + i * C, gmp + i * Dm, as, am);
      }
    });
    for (int64_t b = 0; b < sh.B; ++b)  // the conv does not read the prefix tokens
      std::fill(gxp + b * T_ * C, gxp + (b * T_ + P) * C, scalar_t(0));
    std::tie(grad_weight, grad_bias) = conv_backward<scalar_t>(g + P * C, x.data_ptr<scalar_t>() + P * C,
                                                               weight_in.contiguous(), gxp + P * C, T_ * C, sh.B, H, W, C);
  });
  const at::Tensor sums = acc.sum(0);  // the chunks' partial sums in a fixed order
  const at::Tensor galpha = sums.narrow(0, C, Dm).view({sh.heads, md}).sum(1) - sums.narrow(0, 0, C).view({sh.heads, hd}).sum(1);
  return {gs, gm, galpha, gx, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY(cached_transformers_cpu, m) {
  m.def("pair_conv3x3_forward(Tensor grid, Tensor weight, Tensor? bias) -> Tensor");
  m.def("pair_conv3x3_backward(Tensor grad, Tensor grid, Tensor weight) -> (Tensor, Tensor, Tensor)");
  m.def("mix_pos_forward(Tensor s, Tensor m, Tensor alpha, Tensor x, Tensor weight, Tensor? bias, int H, int W) -> Tensor");
  m.def("mix_pos_backward(Tensor grad, Tensor s, Tensor m, Tensor alpha, Tensor x, Tensor weight, int H, int W) -> Tensor[]");
  m.impl("pair_conv3x3_forward", c10::DispatchKey::CPU, TORCH_FN(pair_conv3x3_forward));
  m.impl("pair_conv3x3_backward", c10::DispatchKey::CPU, TORCH_FN(pair_conv3x3_backward));
  m.impl("mix_pos_forward", c10::DispatchKey::CPU, TORCH_FN(mix_pos_forward));
  m.impl("mix_pos_backward", c10::DispatchKey::CPU, TORCH_FN(mix_pos_backward));
}
