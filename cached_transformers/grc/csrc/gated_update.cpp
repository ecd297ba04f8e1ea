// The GRC gated update on CPU, forward and backward, with the elementwise work fused around its one GEMM.
// Built on first use by cached_transformers/grc/native.py, together with pair_conv.cpp.
//
// For z = [z_r | z_u | z_c] (B x T x 3D, the pre-activations of the reset and update gates and the summary
// side of the candidate), the stored cache p (1 x T x D, broadcast over B) and Wc (D x D, the candidate's
// cache-side weight):
//     r = sigmoid(z_r),  q = r * p,  a = z_c + q Wc^T,  c = LN(gelu(a)) (or c = a: "linear" candidate),
//     u = sigmoid(z_u),  new = p + u (c - p)
// Eagerly that is about ten passes over B x T x D and twice as many in the backward; here it is one pass
// before the GEMM and one after (q and a are kept for the backward), and the backward makes one pass, two
// GEMMs and one pass. Rows are split among threads by cache position, so the sums over the
// batch (the gradient of p) and over rows (LayerNorm's weight and bias) are taken in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using at::vec::Vectorized;

// Inline exponentials (ATen's exp_u20, the one its own sigmoid and softmax use): a call into the math library
// per vector costs more than the rest of a row's work here.
template <typename T> inline Vectorized<T> sigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  return one / (one + x.neg().exp_u20());
}

// erf: for float the Abramowitz-Stegun 7.1.26 form that ATen's own vectorised erf (and so F.gelu) uses, with the
// inline exponential; for double (tests) ATen's erf
template <typename T> inline Vectorized<T> erf(const Vectorized<T>& x) {
  using V = Vectorized<T>;
  if constexpr (!std::is_same_v<T, float>) {
    return x.erf();
  } else {
    const V one(1.f), a = x.abs();
    const V t = one / (V(0.3275911f) * a + one);
    const V r = (((V(1.061405429f) * t + V(-1.453152027f)) * t + V(1.421413741f)) * t + V(-0.284496736f)) * t +
                V(0.254829592f);
    const V y = one - r * t * (x * x).neg().exp_u20();
    return V::blendv(y, y.neg(), x < V(0.f));
  }
}

template <typename T> inline Vectorized<T> gelu(const Vectorized<T>& x) {  // exact (erf) GELU, as F.gelu
  return Vectorized<T>(T(0.5)) * x * (Vectorized<T>(T(1)) + erf(x * Vectorized<T>(T(M_SQRT1_2))));
}

template <typename T> inline Vectorized<T> gelu_grad(const Vectorized<T>& x) {
  const Vectorized<T> cdf = Vectorized<T>(T(0.5)) * (Vectorized<T>(T(1)) + erf(x * Vectorized<T>(T(M_SQRT1_2))));
  const Vectorized<T> pdf = (x * x * Vectorized<T>(T(-0.5))).exp_u20() * Vectorized<T>(T(0.5 * M_2_SQRTPI * M_SQRT1_2));
  return cdf + x * pdf;
}

// f(offset, count) over [0, D) in vectors, the last one partial
template <typename T, typename F> inline void over_row(int64_t D, const F& f) {
  constexpr int64_t N = Vectorized<T>::size();
  for (int64_t j = 0; j < D; j += N) f(j, std::min<int64_t>(N, D - j));
}

template <typename T> inline T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; }, v);
}

// v in the first k lanes, zeros after (a partial vector's unused lanes must not enter a sum)
template <typename T> inline Vectorized<T> first(const Vectorized<T>& v, int64_t k) {
  return k == Vectorized<T>::size() ? v : Vectorized<T>::set(Vectorized<T>(T(0)), v, k);
}

// Each row is a few cache lines and its work (sigmoids, erf) is long, so the processor runs ahead by less
// than a row: without prefetching every row waits for memory. Rows `ahead` positions later are requested.
constexpr int64_t ahead = 4;
template <typename T> inline void prefetch(const T* p, int64_t count, bool write = false) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < count * int64_t(sizeof(T)); i += 64) {
    if (write)
      __builtin_prefetch(c + i, 1);
    else
      __builtin_prefetch(c + i, 0);
  }
}

struct Shape {
  int64_t B, T, D;
};

Shape check(const at::Tensor& z, const at::Tensor& prev, const at::Tensor& wc, const c10::optional<at::Tensor>& lnw,
            const c10::optional<at::Tensor>& lnb) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 3 && z.size(2) % 3 == 0,
              "gated_update (native): z must be a B x T x 3D CPU tensor.");
  const Shape s{z.size(0), z.size(1), z.size(2) / 3};
  TORCH_CHECK(prev.dim() == 3 && prev.size(0) == 1 && prev.size(1) == s.T && prev.size(2) == s.D,
              "gated_update (native): the cache must be 1 x T x D for z of ", z.sizes(), ".");
  TORCH_CHECK(wc.dim() == 2 && wc.size(0) == s.D && wc.size(1) == s.D, "gated_update (native): Wc must be D x D.");
  TORCH_CHECK(lnw.has_value() == lnb.has_value(), "gated_update (native): pass both LayerNorm parameters or neither.");
  for (const at::Tensor& t : {prev, wc})
    TORCH_CHECK(t.scalar_type() == z.scalar_type(), "gated_update (native): all inputs must share z's dtype.");
  return s;
}

// q = sigmoid(z_r) * p for every row (b, t); rows are B x T, z's rows 3D long
template <typename T> void reset_kernel(const T* z, const T* p, T* q, const Shape& s) {
  at::parallel_for(0, s.B * s.T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (n + ahead < end) {
        prefetch(z + (n + ahead) * 3 * s.D, s.D);
        prefetch(q + (n + ahead) * s.D, s.D, true);
      }
      over_row<T>(s.D, [&](int64_t j, int64_t k) {
        const auto r = sigmoid(Vectorized<T>::loadu(z + n * 3 * s.D + j, k));
        (r * Vectorized<T>::loadu(p + (n % s.T) * s.D + j, k)).store(q + n * s.D + j, k);
      });
    }
  });
}

// the candidate of one row from a = z_c + q Wc^T (held in a), into c; xhat and rstd kept for the backward
template <typename T>
inline void candidate_row(const T* a, const T* lnw, const T* lnb, double eps, int64_t D, T* c, T* xhat, T& rstd) {
  if (!lnw) {
    std::copy(a, a + D, c);
    return;
  }
  using V = Vectorized<T>;
  V total(T(0)), squares(T(0));
  over_row<T>(D, [&](int64_t j, int64_t k) {
    const V g = gelu(V::loadu(a + j, k));
    g.store(xhat + j, k);
    total += first(g, k);
  });
  const V mean(hsum(total) / D);
  over_row<T>(D, [&](int64_t j, int64_t k) {
    const V d = first(V::loadu(xhat + j, k) - mean, k);
    squares += d * d;
  });
  rstd = T(1) / std::sqrt(hsum(squares) / D + T(eps));
  const V vr(rstd);
  over_row<T>(D, [&](int64_t j, int64_t k) {
    const V xh = (V::loadu(xhat + j, k) - mean) * vr;
    xh.store(xhat + j, k);
    (xh * V::loadu(lnw + j, k) + V::loadu(lnb + j, k)).store(c + j, k);
  });
}

// -> (new, q, a): q and a are kept for the backward
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_update_forward(const at::Tensor& z_in, const at::Tensor& prev_in, const at::Tensor& wc_in,
                                const c10::optional<at::Tensor>& lnw_in, const c10::optional<at::Tensor>& lnb_in,
                                double eps) {
  const Shape s = check(z_in, prev_in, wc_in, lnw_in, lnb_in);
  const at::Tensor z = z_in.contiguous(), prev = prev_in.contiguous(), wc = wc_in.contiguous();
  const at::Tensor lnw = lnw_in.has_value() ? lnw_in->contiguous() : at::Tensor();
  const at::Tensor lnb = lnb_in.has_value() ? lnb_in->contiguous() : at::Tensor();
  const int64_t D = s.D;
  at::Tensor q = at::empty({s.B, s.T, D}, z.options());
  at::Tensor out = at::empty({s.B, s.T, D}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gated_update_forward", [&] {
    reset_kernel<scalar_t>(z.data_ptr<scalar_t>(), prev.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), s);
  });
  at::Tensor a = at::mm(q.view({s.B * s.T, D}), wc.t());  // the candidate's cache side, then a = z_c + it
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gated_update_forward", [&] {
    using T = scalar_t;
    const T *zp = z.data_ptr<T>(), *pp = prev.data_ptr<T>();
    const T *w = lnw.defined() ? lnw.data_ptr<T>() : nullptr, *bb = lnb.defined() ? lnb.data_ptr<T>() : nullptr;
    T *ap = a.data_ptr<T>(), *op = out.data_ptr<T>();
    at::parallel_for(0, s.B * s.T, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> c(D), xhat(D);
      T rstd;
      for (int64_t n = begin; n < end; ++n) {
        if (n + ahead < end) {
          prefetch(ap + (n + ahead) * D, D);
          prefetch(zp + (n + ahead) * 3 * D + D, 2 * D);
          prefetch(op + (n + ahead) * D, D, true);
        }
        const T *zn = zp + n * 3 * D, *pn = pp + (n % s.T) * D;
        T* an = ap + n * D;
        over_row<T>(D, [&](int64_t j, int64_t k) {
          (Vectorized<T>::loadu(an + j, k) + Vectorized<T>::loadu(zn + 2 * D + j, k)).store(an + j, k);
        });
        candidate_row(an, w, bb, eps, D, c.data(), xhat.data(), rstd);
        over_row<T>(D, [&](int64_t j, int64_t k) {
          const auto u = sigmoid(Vectorized<T>::loadu(zn + D + j, k));
          const auto pv = Vectorized<T>::loadu(pn + j, k);
          (pv + u * (Vectorized<T>::loadu(c.data() + j, k) - pv)).store(op + n * D + j, k);
        });
      }
    });
  });
  return {out, q, a.view({s.B, s.T, D})};
}

// -> (d z, d prev, d Wc, d LN weight, d LN bias); the LayerNorm gradients have no elements for a linear candidate
std::vector<at::Tensor> gated_update_backward(const at::Tensor& grad_in, const at::Tensor& z_in,
                                              const at::Tensor& prev_in, const at::Tensor& wc_in,
                                              const at::Tensor& q_in, const at::Tensor& a_in,
                                              const c10::optional<at::Tensor>& lnw_in,
                                              const c10::optional<at::Tensor>& lnb_in, double eps) {
  const Shape s = check(z_in, prev_in, wc_in, lnw_in, lnb_in);
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == s.B && grad_in.size(1) == s.T && grad_in.size(2) == s.D,
              "gated_update (native): the gradient's shape differs from the output's.");
  const at::Tensor grad = grad_in.to(z_in.scalar_type()).contiguous();
  const at::Tensor z = z_in.contiguous(), prev = prev_in.contiguous(), wc = wc_in.contiguous();
  const bool norm = lnw_in.has_value();
  const at::Tensor lnw = norm ? lnw_in->contiguous() : at::Tensor(), lnb = norm ? lnb_in->contiguous() : at::Tensor();
  const int64_t B = s.B, T_ = s.T, D = s.D;
  TORCH_CHECK(q_in.numel() == B * T_ * D && a_in.numel() == B * T_ * D,
              "gated_update (native): q and a must be the forward's B x T x D outputs.");
  const at::Tensor q2 = q_in.contiguous().view({B * T_, D}), a = a_in.contiguous();
  at::Tensor gz = at::empty({B, T_, 3 * D}, z.options()), gprev = at::empty({1, T_, D}, z.options());
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), T_));
  at::Tensor acc = at::zeros({n_chunks, 2, D}, z.options());  // per chunk: LN weight and bias gradients
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gated_update_backward", [&] {
    using T = scalar_t;
    using V = Vectorized<T>;
    const T *g = grad.data_ptr<T>(), *zp = z.data_ptr<T>(), *pp = prev.data_ptr<T>(), *ap = a.data_ptr<T>();
    const T *w = norm ? lnw.data_ptr<T>() : nullptr, *bb = norm ? lnb.data_ptr<T>() : nullptr;
    T *gzp = gz.data_ptr<T>(), *gpp = gprev.data_ptr<T>();
    at::parallel_for(0, n_chunks, 1, [&](int64_t first, int64_t last) {
      std::vector<T> c(D), xhat(D), dln(D);
      T rstd = 1;
      for (int64_t chunk = first; chunk < last; ++chunk) {
        T* gw = acc.data_ptr<T>() + chunk * 2 * D;
        T* gb = gw + D;
        const int64_t t0 = T_ * chunk / n_chunks, t1 = T_ * (chunk + 1) / n_chunks;
        std::fill(gpp + t0 * D, gpp + t1 * D, T(0));
        for (int64_t b = 0; b < B; ++b)  // d p sums over the batch in batch order
          for (int64_t t = t0; t < t1; ++t) {
            const T* pt = pp + t * D;
            T* gpt = gpp + t * D;
            const int64_t n = b * T_ + t;
            if (t + ahead < t1) {
              prefetch(ap + (n + ahead) * D, D);
              prefetch(zp + (n + ahead) * 3 * D + D, 2 * D);
              prefetch(g + (n + ahead) * D, D);
              prefetch(gzp + (n + ahead) * 3 * D + D, 2 * D, true);
            }
            const T *zn = zp + n * 3 * D, *gn = g + n * D, *an = ap + n * D;
            T* gzn = gzp + n * 3 * D;
            candidate_row(an, w, bb, eps, D, c.data(), xhat.data(), rstd);
            over_row<T>(D, [&](int64_t j, int64_t k) {  // through new = p + u (c - p)
              const V u = sigmoid(V::loadu(zn + D + j, k)), gv = V::loadu(gn + j, k), pv = V::loadu(pt + j, k);
              (gv * u).store(dln.data() + j, k);
              (gv * (V::loadu(c.data() + j, k) - pv) * u * (V(T(1)) - u)).store(gzn + D + j, k);
              (V::loadu(gpt + j, k) + gv * (V(T(1)) - u)).store(gpt + j, k);
            });
            T* gc = gzn + 2 * D;  // d a = d z_c
            if (!norm) {
              std::copy(dln.begin(), dln.end(), gc);
              continue;
            }
            V sum_dx(T(0)), sum_dx_xhat(T(0));  // LayerNorm, with dxhat = dln * w (zeros past k)
            over_row<T>(D, [&](int64_t j, int64_t k) {
              const V d = V::loadu(dln.data() + j, k), xh = V::loadu(xhat.data() + j, k), dx = d * V::loadu(w + j, k);
              (V::loadu(gw + j, k) + d * xh).store(gw + j, k);
              (V::loadu(gb + j, k) + d).store(gb + j, k);
              sum_dx += dx;
              sum_dx_xhat += dx * xh;
            });
            const V mean_dx(hsum(sum_dx) / D), mean_dx_xhat(hsum(sum_dx_xhat) / D), vr(rstd);
            over_row<T>(D, [&](int64_t j, int64_t k) {  // then through gelu
              const V dx = V::loadu(dln.data() + j, k) * V::loadu(w + j, k);
              const V gxh = vr * (dx - mean_dx - V::loadu(xhat.data() + j, k) * mean_dx_xhat);
              (gxh * gelu_grad(V::loadu(an + j, k))).store(gc + j, k);
            });
          }
      }
    });
  });
  // through a = z_c + q Wc^T: d q = d a Wc, d Wc = d a^T q (d a is a strided view of d z)
  const at::Tensor ga = gz.view({B * T_, 3 * D}).narrow(1, 2 * D, D);
  const at::Tensor gq = at::mm(ga, wc);
  const at::Tensor gwc = at::mm(ga.t(), q2);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gated_update_backward_reset", [&] {
    using T = scalar_t;
    using V = Vectorized<T>;
    const T *gqp = gq.data_ptr<T>(), *zp = z.data_ptr<T>(), *pp = prev.data_ptr<T>();
    T *gzp = gz.data_ptr<T>(), *gpp = gprev.data_ptr<T>();
    at::parallel_for(0, T_, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = 0; b < B; ++b)  // through q = sigmoid(z_r) * p; d p in batch order
        for (int64_t t = begin; t < end; ++t) {
          const int64_t n = b * T_ + t;
          if (t + ahead < end) {
            prefetch(zp + (n + ahead) * 3 * D, D);
            prefetch(gqp + (n + ahead) * D, D);
            prefetch(gzp + (n + ahead) * 3 * D, D, true);
          }
          over_row<T>(D, [&](int64_t j, int64_t k) {
            const V r = sigmoid(V::loadu(zp + n * 3 * D + j, k)), gqv = V::loadu(gqp + n * D + j, k);
            (gqv * V::loadu(pp + t * D + j, k) * r * (V(T(1)) - r)).store(gzp + n * 3 * D + j, k);
            (V::loadu(gpp + t * D + j, k) + gqv * r).store(gpp + t * D + j, k);
          });
        }
    });
  });
  const at::Tensor sums = acc.sum(0);  // the chunks' partial sums in a fixed order
  if (!norm)  // a linear candidate has no LayerNorm (two distinct empty tensors: outputs may not alias)
    return {gz, gprev, gwc, at::empty({0}, z.options()), at::empty({0}, z.options())};
  return {gz, gprev, gwc, sums[0].clone(), sums[1].clone()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cached_transformers_cpu, m) {
  m.def("gated_update_forward(Tensor z, Tensor prev, Tensor wc, Tensor? ln_weight, Tensor? ln_bias, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("gated_update_backward(Tensor grad, Tensor z, Tensor prev, Tensor wc, Tensor q, Tensor a, Tensor? ln_weight, "
        "Tensor? ln_bias, float eps) -> Tensor[]");
  m.impl("gated_update_forward", c10::DispatchKey::CPU, TORCH_FN(gated_update_forward));
  m.impl("gated_update_backward", c10::DispatchKey::CPU, TORCH_FN(gated_update_backward));
}
