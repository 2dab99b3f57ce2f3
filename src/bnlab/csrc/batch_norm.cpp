// CPU kernels for batch normalization: training and inference forward, and backward.
//
// Built by bnlab/kernels.py with the system C++ compiler and loaded through ctypes; no torch headers,
// so a build takes about a second. Every entry point works on one of two memory layouts:
//
//   planar       (N, C, S)  element (n, c, s) at n*C*S + c*S + s   (contiguous NCL, NCHW, NCDHW)
//   interleaved  (M, C)     element (m, c)    at m*C + c           ((N, C) input and channels-last)
//
// Numerics. Statistics are reduced block by block: inside a block (a row of a planar channel, or a tile
// of rows of an interleaved matrix, small enough to stay in L1) the sums run in the input type over
// values shifted by an estimate of the block mean (the "corrected two-pass" scheme of Chan, Golub and
// LeVeque), and blocks are merged in double with Chan's parallel formula. The input is read once from
// memory for the statistics, there is no E[x^2] - E[x]^2 cancellation, and a channel whose mean is
// 1e4 times its standard deviation still normalizes to unit variance.
//
// Threads: OpenMP. Loaded after torch, the library binds to the libgomp that torch already loaded, so
// it shares torch's thread pool and honours torch.set_num_threads().
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#else  // built without OpenMP: every kernel runs on the calling thread
inline int omp_get_max_threads() { return 1; }
inline int omp_get_num_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
#endif

namespace {

using index_t = int64_t;

// Below this many elements a kernel runs on the calling thread: waking the pool costs more than it saves.
constexpr index_t kParallelThreshold = 1 << 15;
// A block of statistics is at most this many elements of one channel: it stays in L1 between its passes.
constexpr index_t kBlockElements = 2048;

int thread_count(index_t numel) {
  return numel < kParallelThreshold ? 1 : omp_get_max_threads();
}

// Running count, mean and sum of squared deviations (M2) of one channel, merged with Chan's formula.
struct Moments {
  double count = 0, mean = 0, m2 = 0;

  void merge(double n_b, double mean_b, double m2_b) {
    if (n_b == 0) return;
    const double n = count + n_b;
    const double delta = mean_b - mean;
    mean += delta * (n_b / n);
    m2 += m2_b + delta * delta * (count * n_b / n);
    count = n;
  }
  void merge(const Moments& other) { merge(other.count, other.mean, other.m2); }
};

// Sums over runs of one channel kept in kLanes independent partial sums per quantity. One accumulator
// would make every addition wait for the previous one (a 4-cycle latency chain); several keep the
// vector units busy. The lanes live across runs and are reduced only when a block is flushed, so short
// rows (a 64-element 8x8 plane) do not pay a horizontal reduction each.
template <typename T>
constexpr index_t kLanes = 128 / sizeof(T);  // four 256-bit registers

template <typename T>
struct LanePairs {
  T a[kLanes<T>] = {}, b[kLanes<T>] = {};
  index_t count = 0;

  // a += first(i), b += second(i) for i in [0, len)
  template <typename First, typename Second>
  inline void add(index_t len, First first, Second second) {
    constexpr index_t L = kLanes<T>;
    index_t i = 0;
    for (; i + L <= len; i += L) {
#pragma omp simd
      for (index_t j = 0; j < L; ++j) {
        a[j] += first(i + j);
        b[j] += second(i + j);
      }
    }
    for (index_t j = 0; i < len; ++i, ++j) {
      a[j] += first(i);
      b[j] += second(i);
    }
    count += len;
  }

  // Reduce the lanes in double, and start over.
  void take(double& sum_a, double& sum_b) {
    sum_a = sum_b = 0;
    for (index_t j = 0; j < kLanes<T>; ++j) {
      sum_a += a[j];
      sum_b += b[j];
      a[j] = b[j] = T(0);
    }
    count = 0;
  }

  void take_into(double& total_a, double& total_b) {
    double sum_a, sum_b;
    take(sum_a, sum_b);
    total_a += sum_a;
    total_b += sum_b;
  }
};

// Sums of (x - shift) and (x - shift)^2 in a LanePairs block, turned into moments with the
// correction of the corrected two-pass algorithm: exact while `shift` is within a few standard
// deviations of the block's mean.
template <typename T>
void flush_shifted(LanePairs<T>& sums, T shift, Moments& acc) {
  const double n = static_cast<double>(sums.count);
  if (n == 0) return;
  double s1, s2;
  sums.take(s1, s2);
  const double correction = s1 / n;
  acc.merge(n, static_cast<double>(shift) + correction, std::max(0.0, s2 - s1 * correction));
}

// A first estimate of a channel's mean from its first run, shifted by the first element so the sum
// does not cancel: the shift for the blocks that follow (each later block shifts by the mean so far).
template <typename T>
T first_estimate(const T* x, index_t len) {
  const T pivot = x[0];
  LanePairs<T> sums;
  sums.add(len, [=](index_t i) { return x[i] - pivot; }, [](index_t) { return T(0); });
  double total, unused;
  sums.take(total, unused);
  return static_cast<T>(pivot + total / static_cast<double>(len));
}

// Batch statistics of one channel -> saved mean and inverse std, and the running statistics update.
template <typename T>
double finish_channel(index_t c, const Moments& m, double eps, double momentum, T* save_mean,
                      T* save_invstd, T* running_mean, T* running_var) {
  const double var = m.m2 / m.count;
  const double invstd = 1.0 / std::sqrt(var + eps);
  save_mean[c] = static_cast<T>(m.mean);
  save_invstd[c] = static_cast<T>(invstd);
  if (running_mean) {
    running_mean[c] = static_cast<T>((1.0 - momentum) * running_mean[c] + momentum * m.mean);
  }
  if (running_var) {
    // The running variance is the unbiased estimate, as torch stores it.
    const double unbiased = m.count > 1 ? m.m2 / (m.count - 1) : var;
    running_var[c] = static_cast<T>((1.0 - momentum) * running_var[c] + momentum * unbiased);
  }
  return invstd;
}

template <typename T>
inline void normalize_run(const T* x, T* y, index_t len, T mean, T scale, T bias) {
#pragma omp simd
  for (index_t i = 0; i < len; ++i) y[i] = (x[i] - mean) * scale + bias;
}

// ---- planar (N, C, S): one thread owns whole channels, so a channel's data is still in cache when it is
// read the second time.

template <typename T>
void forward_train_planar(const T* x, T* y, index_t N, index_t C, index_t S, const T* weight,
                          const T* bias, T* save_mean, T* save_invstd, T* running_mean,
                          T* running_var, double momentum, double eps) {
#pragma omp parallel for schedule(static) num_threads(thread_count(N * C * S))
  for (index_t c = 0; c < C; ++c) {
    Moments m;
    LanePairs<T> sums;
    T pivot = first_estimate(x + c * S, std::min(S, kBlockElements));
    for (index_t n = 0; n < N; ++n) {
      const T* row = x + (n * C + c) * S;
      for (index_t s = 0; s < S; s += kBlockElements) {
        const T* run = row + s;
        sums.add(
            std::min(kBlockElements, S - s), [=](index_t i) { return run[i] - pivot; },
            [=](index_t i) { return (run[i] - pivot) * (run[i] - pivot); });
        if (sums.count >= kBlockElements) {
          flush_shifted(sums, pivot, m);
          pivot = static_cast<T>(m.mean);
        }
      }
    }
    flush_shifted(sums, pivot, m);
    const double invstd =
        finish_channel(c, m, eps, momentum, save_mean, save_invstd, running_mean, running_var);
    const T scale = static_cast<T>(weight ? weight[c] * invstd : invstd);
    const T shift = bias ? bias[c] : T(0);
    const T mean = save_mean[c];
    for (index_t n = 0; n < N; ++n) {
      const index_t offset = (n * C + c) * S;
      normalize_run(x + offset, y + offset, S, mean, scale, shift);
    }
  }
}

template <typename T>
void forward_eval_planar(const T* x, T* y, index_t N, index_t C, index_t S, const T* mean,
                         const T* scale, const T* shift) {
#pragma omp parallel for schedule(static) num_threads(thread_count(N * C * S))
  for (index_t nc = 0; nc < N * C; ++nc) {
    const index_t c = nc % C;
    normalize_run(x + nc * S, y + nc * S, S, mean[c], scale[c], shift[c]);
  }
}

// dx = dy * k_dy + (x - mean) * k_xmu + k_const
template <typename T>
inline void grad_input_run(const T* x, const T* dy, T* dx, index_t len, T mean, T k_dy, T k_xmu,
                           T k_const) {
#pragma omp simd
  for (index_t i = 0; i < len; ++i) dx[i] = dy[i] * k_dy + (x[i] - mean) * k_xmu + k_const;
}

// Coefficients of the input gradient. Training: the batch statistics depend on x, which adds the
// -mean(dy) and -x_hat * mean(dy * x_hat) terms; inference: dx = dy * weight * invstd.
template <typename T>
void grad_coefficients(bool training, double count, double sum_dy, double sum_dy_xmu, double invstd,
                       double w, T& k_dy, T& k_xmu, T& k_const) {
  const double scale = w * invstd;
  k_dy = static_cast<T>(scale);
  k_xmu = training ? static_cast<T>(-scale * invstd * invstd * sum_dy_xmu / count) : T(0);
  k_const = training ? static_cast<T>(-scale * sum_dy / count) : T(0);
}

template <typename T>
void backward_planar(const T* x, const T* dy, T* dx, index_t N, index_t C, index_t S, const T* mean,
                     const T* invstd, const T* weight, T* grad_weight, T* grad_bias, bool training) {
  const bool need_sums = training || grad_weight || grad_bias;
#pragma omp parallel for schedule(static) num_threads(thread_count(N * C * S))
  for (index_t c = 0; c < C; ++c) {
    double sum_dy = 0, sum_dy_xmu = 0;
    if (need_sums) {
      const T mu = mean[c];
      LanePairs<T> sums;
      for (index_t n = 0; n < N; ++n) {
        const index_t offset = (n * C + c) * S;
        for (index_t s = 0; s < S; s += kBlockElements) {
          const T* xr = x + offset + s;
          const T* gr = dy + offset + s;
          sums.add(
              std::min(kBlockElements, S - s), [=](index_t i) { return gr[i]; },
              [=](index_t i) { return gr[i] * (xr[i] - mu); });
          if (sums.count >= kBlockElements) sums.take_into(sum_dy, sum_dy_xmu);
        }
      }
      sums.take_into(sum_dy, sum_dy_xmu);
    }
    if (grad_weight) grad_weight[c] = static_cast<T>(sum_dy_xmu * invstd[c]);
    if (grad_bias) grad_bias[c] = static_cast<T>(sum_dy);
    if (!dx) continue;
    T k_dy, k_xmu, k_const;
    grad_coefficients(training, static_cast<double>(N * S), sum_dy, sum_dy_xmu, invstd[c],
                      weight ? static_cast<double>(weight[c]) : 1.0, k_dy, k_xmu, k_const);
    for (index_t n = 0; n < N; ++n) {
      const index_t offset = (n * C + c) * S;
      grad_input_run(x + offset, dy + offset, dx + offset, S, mean[c], k_dy, k_xmu, k_const);
    }
  }
}

// ---- interleaved (M, C): threads split the rows; per-thread partial results are merged after a barrier.

struct RowRange {
  index_t begin, end;
};

RowRange rows_of_thread(index_t M) {
  const index_t threads = omp_get_num_threads(), t = omp_get_thread_num();
  const index_t per = (M + threads - 1) / threads;
  return {std::min(M, t * per), std::min(M, (t + 1) * per)};
}

// Rows of the first tile, read twice to estimate each channel's shift: small enough to stay in L1.
index_t first_tile_rows(index_t C) { return std::max<index_t>(1, kBlockElements / C); }
// Rows summed in the input type before a merge: at least 256 so merges (two divisions per channel)
// stay rare, and at most what keeps float sums accurate.
index_t block_rows(index_t C) { return std::max<index_t>(256, kBlockElements / C); }

// Moments of every channel over rows [r.begin, r.end), the scheme of the planar kernel across rows:
// the first tile estimates a shift per channel in an extra pass, later blocks shift by the mean so far.
template <typename T>
void accumulate_rows(const T* x, index_t C, RowRange r, Moments* acc) {
  if (r.begin >= r.end) return;
  std::vector<T> shift(C), s1(C, T(0)), s2(C, T(0));
  const T* first = x + r.begin * C;
  const index_t first_end = std::min(r.end, r.begin + first_tile_rows(C));
  for (index_t m = r.begin; m < first_end; ++m) {
#pragma omp simd
    for (index_t c = 0; c < C; ++c) s1[c] += x[m * C + c] - first[c];
  }
  for (index_t c = 0; c < C; ++c) shift[c] = first[c] + s1[c] / static_cast<T>(first_end - r.begin);
  const index_t step = block_rows(C);
  for (index_t r0 = r.begin; r0 < r.end; r0 += step) {
    const index_t r1 = std::min(r.end, r0 + step);
    std::fill(s1.begin(), s1.end(), T(0));
    std::fill(s2.begin(), s2.end(), T(0));
    for (index_t m = r0; m < r1; ++m) {
      const T* row = x + m * C;
#pragma omp simd
      for (index_t c = 0; c < C; ++c) {
        const T d = row[c] - shift[c];
        s1[c] += d;
        s2[c] += d * d;
      }
    }
    const double n = static_cast<double>(r1 - r0);
    for (index_t c = 0; c < C; ++c) {
      const double correction = static_cast<double>(s1[c]) / n;
      acc[c].merge(n, static_cast<double>(shift[c]) + correction,
                   std::max(0.0, static_cast<double>(s2[c]) - static_cast<double>(s1[c]) * correction));
      shift[c] = static_cast<T>(acc[c].mean);
    }
  }
}

template <typename T>
void normalize_rows(const T* x, T* y, index_t C, RowRange r, const T* mean, const T* scale,
                    const T* shift) {
  for (index_t m = r.begin; m < r.end; ++m) {
    const T* xr = x + m * C;
    T* yr = y + m * C;
#pragma omp simd
    for (index_t c = 0; c < C; ++c) yr[c] = (xr[c] - mean[c]) * scale[c] + shift[c];
  }
}

template <typename T>
void forward_train_interleaved(const T* x, T* y, index_t M, index_t C, const T* weight,
                               const T* bias, T* save_mean, T* save_invstd, T* running_mean,
                               T* running_var, double momentum, double eps) {
  const int threads = thread_count(M * C);
  std::vector<Moments> partial(static_cast<size_t>(threads) * C);
  std::vector<T> scale(C), shift(C);
#pragma omp parallel num_threads(threads)
  {
    const RowRange r = rows_of_thread(M);
    accumulate_rows(x, C, r, partial.data() + omp_get_thread_num() * C);
#pragma omp barrier
#pragma omp for schedule(static)
    for (index_t c = 0; c < C; ++c) {
      Moments m = partial[c];
      for (int t = 1; t < omp_get_num_threads(); ++t) m.merge(partial[t * C + c]);
      const double invstd =
          finish_channel(c, m, eps, momentum, save_mean, save_invstd, running_mean, running_var);
      scale[c] = static_cast<T>(weight ? weight[c] * invstd : invstd);
      shift[c] = bias ? bias[c] : T(0);
    }
    // the implicit barrier of `omp for` publishes scale and shift
    normalize_rows(x, y, C, r, save_mean, scale.data(), shift.data());
  }
}

template <typename T>
void forward_eval_interleaved(const T* x, T* y, index_t M, index_t C, const T* mean, const T* scale,
                              const T* shift) {
#pragma omp parallel num_threads(thread_count(M * C))
  normalize_rows(x, y, C, rows_of_thread(M), mean, scale, shift);
}

template <typename T>
void backward_interleaved(const T* x, const T* dy, T* dx, index_t M, index_t C, const T* mean,
                          const T* invstd, const T* weight, T* grad_weight, T* grad_bias,
                          bool training) {
  const int threads = thread_count(M * C);
  const bool need_sums = training || grad_weight || grad_bias;
  std::vector<double> partial(static_cast<size_t>(threads) * 2 * C, 0.0);
  std::vector<T> k_dy(C), k_xmu(C), k_const(C);
#pragma omp parallel num_threads(threads)
  {
    const RowRange r = rows_of_thread(M);
    if (need_sums) {
      double* sum_dy = partial.data() + omp_get_thread_num() * 2 * C;
      double* sum_dy_xmu = sum_dy + C;
      std::vector<T> a(C), b(C);
      const index_t step = block_rows(C);
      for (index_t r0 = r.begin; r0 < r.end; r0 += step) {
        std::fill(a.begin(), a.end(), T(0));
        std::fill(b.begin(), b.end(), T(0));
        for (index_t m = r0; m < std::min(r.end, r0 + step); ++m) {
          const T* xr = x + m * C;
          const T* gr = dy + m * C;
#pragma omp simd
          for (index_t c = 0; c < C; ++c) {
            a[c] += gr[c];
            b[c] += gr[c] * (xr[c] - mean[c]);
          }
        }
        for (index_t c = 0; c < C; ++c) {
          sum_dy[c] += a[c];
          sum_dy_xmu[c] += b[c];
        }
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (index_t c = 0; c < C; ++c) {
      double sum_dy = 0, sum_dy_xmu = 0;
      for (int t = 0; t < omp_get_num_threads(); ++t) {
        sum_dy += partial[t * 2 * C + c];
        sum_dy_xmu += partial[t * 2 * C + C + c];
      }
      if (grad_weight) grad_weight[c] = static_cast<T>(sum_dy_xmu * invstd[c]);
      if (grad_bias) grad_bias[c] = static_cast<T>(sum_dy);
      grad_coefficients(training, static_cast<double>(M), sum_dy, sum_dy_xmu, invstd[c],
                        weight ? static_cast<double>(weight[c]) : 1.0, k_dy[c], k_xmu[c], k_const[c]);
    }
    if (dx) {
      for (index_t m = r.begin; m < r.end; ++m) {
        const T* xr = x + m * C;
        const T* gr = dy + m * C;
        T* dr = dx + m * C;
#pragma omp simd
        for (index_t c = 0; c < C; ++c) {
          dr[c] = gr[c] * k_dy[c] + (xr[c] - mean[c]) * k_xmu[c] + k_const[c];
        }
      }
    }
  }
}

// ---- dispatch on layout: S == 0 marks the interleaved layout (M = N rows).

template <typename T>
void forward_train(const T* x, T* y, index_t N, index_t C, index_t S, const T* weight, const T* bias,
                   T* save_mean, T* save_invstd, T* running_mean, T* running_var, double momentum,
                   double eps) {
  if (S == 0) {
    forward_train_interleaved(x, y, N, C, weight, bias, save_mean, save_invstd, running_mean,
                              running_var, momentum, eps);
  } else {
    forward_train_planar(x, y, N, C, S, weight, bias, save_mean, save_invstd, running_mean,
                         running_var, momentum, eps);
  }
}

// Inference: statistics given (running mean and variance); also writes the inverse std for backward.
template <typename T>
void forward_eval(const T* x, T* y, index_t N, index_t C, index_t S, const T* weight, const T* bias,
                  const T* mean, const T* var, T* save_invstd, double eps) {
  std::vector<T> scale(C), shift(C);
  for (index_t c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt(static_cast<double>(var[c]) + eps);
    save_invstd[c] = static_cast<T>(invstd);
    scale[c] = static_cast<T>(weight ? weight[c] * invstd : invstd);
    shift[c] = bias ? bias[c] : T(0);
  }
  if (S == 0) {
    forward_eval_interleaved(x, y, N, C, mean, scale.data(), shift.data());
  } else {
    forward_eval_planar(x, y, N, C, S, mean, scale.data(), shift.data());
  }
}

template <typename T>
void backward(const T* x, const T* dy, T* dx, index_t N, index_t C, index_t S, const T* mean,
              const T* invstd, const T* weight, T* grad_weight, T* grad_bias, int training) {
  if (S == 0) {
    backward_interleaved(x, dy, dx, N, C, mean, invstd, weight, grad_weight, grad_bias, training);
  } else {
    backward_planar(x, dy, dx, N, C, S, mean, invstd, weight, grad_weight, grad_bias, training);
  }
}

}  // namespace

#define BNLAB_EXPORT(T, suffix)                                                                      \
  extern "C" void bnlab_forward_train_##suffix(                                                     \
      const T* x, T* y, index_t N, index_t C, index_t S, const T* weight, const T* bias,            \
      T* save_mean, T* save_invstd, T* running_mean, T* running_var, double momentum, double eps) { \
    forward_train(x, y, N, C, S, weight, bias, save_mean, save_invstd, running_mean, running_var,   \
                  momentum, eps);                                                                   \
  }                                                                                                 \
  extern "C" void bnlab_forward_eval_##suffix(const T* x, T* y, index_t N, index_t C, index_t S,    \
                                              const T* weight, const T* bias, const T* mean,        \
                                              const T* var, T* save_invstd, double eps) {           \
    forward_eval(x, y, N, C, S, weight, bias, mean, var, save_invstd, eps);                         \
  }                                                                                                 \
  extern "C" void bnlab_backward_##suffix(const T* x, const T* dy, T* dx, index_t N, index_t C,     \
                                          index_t S, const T* mean, const T* invstd,                \
                                          const T* weight, T* grad_weight, T* grad_bias,            \
                                          int training) {                                           \
    backward(x, dy, dx, N, C, S, mean, invstd, weight, grad_weight, grad_bias, training);           \
  }

BNLAB_EXPORT(float, f32)
BNLAB_EXPORT(double, f64)

extern "C" int bnlab_abi_version() { return 1; }
extern "C" int bnlab_max_threads() { return omp_get_max_threads(); }
