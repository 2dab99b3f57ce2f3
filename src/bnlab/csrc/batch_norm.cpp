// Batch normalization for CPU: the kernels (training and inference forward, backward) and the torch
// operator bnlab::batch_norm, whose autograd function lives here in C++ too.
//
// Built by bnlab/kernels.py against the installed torch's headers (no Python headers) and loaded with
// torch.ops.load_library. A C++ autograd function costs a few microseconds per call where a Python
// torch.autograd.Function costs about twenty: for a small layer that is most of the time.
//
// Every kernel works on one of two memory layouts:
//
//   planar       (N, C, S)  element (n, c, s) at n*C*S + c*S + s   (contiguous NCL, NCHW, NCDHW)
//   interleaved  (M, C)     element (m, c)    at m*C + c           ((N, C) input and channels-last)
//
// Numerics. Statistics are reduced block by block: inside a block the sums run in the input type over
// values shifted by an estimate of the mean (the "corrected two-pass" scheme of Chan, Golub and
// LeVeque), and blocks are merged in double with Chan's parallel formula. The input is read once from
// memory for the statistics, there is no E[x^2] - E[x]^2 cancellation, and a channel whose mean is
// 1e4 times its standard deviation still normalizes to unit variance.
//
// Threads: OpenMP, sharing the libgomp that torch already loaded (so torch.set_num_threads applies).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

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

struct RowRange {
  index_t begin, end;
};

// Thread t's contiguous share of [0, n) when `threads` split it.
RowRange share(index_t n, int t, int threads) {
  const index_t per = (n + threads - 1) / threads;
  return {std::min(n, t * per), std::min(n, (t + 1) * per)};
}

// body(t, threads) for every thread t of a team: on the calling thread alone when one is enough, since
// entering an OpenMP region, even of one thread, costs microseconds that a small layer feels.
template <typename Body>
void run_threads(int threads, Body body) {
  if (threads == 1) {
    body(0, 1);
    return;
  }
#pragma omp parallel num_threads(threads)
  body(omp_get_thread_num(), omp_get_num_threads());
}

// body(i) for i in [0, n), split into contiguous shares (OpenMP's static schedule).
template <typename Body>
void for_each_index(index_t n, int threads, Body body) {
  run_threads(threads, [&](int t, int team) {
    const RowRange r = share(n, t, team);
    for (index_t i = r.begin; i < r.end; ++i) body(i);
  });
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

// ---- planar (N, C, S). Two ways to split the work between threads:
//  - by channel (long planes): one thread owns whole channels, so a channel's data is still in cache
//    when it is read the second time;
//  - by batch (planes of at most a page, or fewer channels than threads): threads split the N samples
//    as the interleaved kernels split rows, and merge their moments per channel. A channel of short
//    planes (an 8x8 map is 256 bytes) is short runs a whole sample apart, each in a page of its own,
//    so the prefetchers start over at every run; a share of the batch is one contiguous stretch.

// Add one plane of a channel, x[0, S), to its shifted sums, flushing a full block into `acc` and then
// moving the shift to the mean so far.
template <typename T>
inline void add_plane(const T* plane, index_t S, LanePairs<T>& sums, T& pivot, Moments& acc) {
  for (index_t s = 0; s < S; s += kBlockElements) {
    const T* run = plane + s;
    const T p = pivot;
    sums.add(
        std::min(kBlockElements, S - s), [=](index_t i) { return run[i] - p; },
        [=](index_t i) { return (run[i] - p) * (run[i] - p); });
    if (sums.count >= kBlockElements) {
      flush_shifted(sums, p, acc);
      pivot = static_cast<T>(acc.mean);
    }
  }
}

// sum(dy) and sum(dy * (x - mean)) of one plane of a channel, the lanes flushed into the double totals
// block by block.
template <typename T>
inline void add_grad_plane(const T* x, const T* dy, index_t S, T mu, LanePairs<T>& sums, double& sum_dy,
                           double& sum_dy_xmu) {
  for (index_t s = 0; s < S; s += kBlockElements) {
    const T* xr = x + s;
    const T* gr = dy + s;
    sums.add(
        std::min(kBlockElements, S - s), [=](index_t i) { return gr[i]; },
        [=](index_t i) { return gr[i] * (xr[i] - mu); });
    if (sums.count >= kBlockElements) sums.take_into(sum_dy, sum_dy_xmu);
  }
}

template <typename T>
void forward_train_planar(const T* x, T* y, index_t N, index_t C, index_t S, const T* weight,
                          const T* bias, T* save_mean, T* save_invstd, T* running_mean,
                          T* running_var, double momentum, double eps) {
  for_each_index(C, thread_count(N * C * S), [&](index_t c) {
    Moments m;
    LanePairs<T> sums;
    T pivot = first_estimate(x + c * S, std::min(S, kBlockElements));
    for (index_t n = 0; n < N; ++n) add_plane(x + (n * C + c) * S, S, sums, pivot, m);
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
  });
}

template <typename T>
void forward_eval_planar(const T* x, T* y, index_t N, index_t C, index_t S, const T* mean,
                         const T* scale, const T* shift) {
  for_each_index(N * C, thread_count(N * C * S), [&](index_t nc) {
    const index_t c = nc % C;
    normalize_run(x + nc * S, y + nc * S, S, mean[c], scale[c], shift[c]);
  });
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
  for_each_index(C, thread_count(N * C * S), [&](index_t c) {
    double sum_dy = 0, sum_dy_xmu = 0;
    if (need_sums) {
      LanePairs<T> sums;
      for (index_t n = 0; n < N; ++n) {
        const index_t offset = (n * C + c) * S;
        add_grad_plane(x + offset, dy + offset, S, mean[c], sums, sum_dy, sum_dy_xmu);
      }
      sums.take_into(sum_dy, sum_dy_xmu);
    }
    if (grad_weight) grad_weight[c] = static_cast<T>(sum_dy_xmu * invstd[c]);
    if (grad_bias) grad_bias[c] = static_cast<T>(sum_dy);
    if (!dx) return;
    T k_dy, k_xmu, k_const;
    grad_coefficients(training, static_cast<double>(N * S), sum_dy, sum_dy_xmu, invstd[c],
                      weight ? static_cast<double>(weight[c]) : 1.0, k_dy, k_xmu, k_const);
    for (index_t n = 0; n < N; ++n) {
      const index_t offset = (n * C + c) * S;
      grad_input_run(x + offset, dy + offset, dx + offset, S, mean[c], k_dy, k_xmu, k_const);
    }
  });
}

// ---- threads splitting rows, then merging per channel: the interleaved kernels (a row is one position's
// C values) and the planar ones split by batch (a row is one sample's C planes).

// Training forward: `accumulate(range, acc)` adds the moments of the range's rows to acc[0, C), one
// partial per thread; merged, they give the statistics, and `normalize(range, scale, shift)` writes the
// range's outputs.
template <typename T, typename Accumulate, typename Normalize>
void forward_train_by_rows(index_t rows, index_t C, int threads, const T* weight, const T* bias, T* save_mean,
                           T* save_invstd, T* running_mean, T* running_var, double momentum, double eps,
                           Accumulate accumulate, Normalize normalize) {
  // A team may be smaller than asked; unused partials stay empty and merge as nothing.
  std::vector<Moments> partial(static_cast<size_t>(threads) * C);
  run_threads(threads, [&](int t, int team) { accumulate(share(rows, t, team), partial.data() + t * C); });
  std::vector<T> scale(C), shift(C);
  for (index_t c = 0; c < C; ++c) {
    Moments m = partial[c];
    for (int t = 1; t < threads; ++t) m.merge(partial[t * C + c]);
    const double invstd = finish_channel(c, m, eps, momentum, save_mean, save_invstd, running_mean, running_var);
    scale[c] = static_cast<T>(weight ? weight[c] * invstd : invstd);
    shift[c] = bias ? bias[c] : T(0);
  }
  run_threads(threads, [&](int t, int team) { normalize(share(rows, t, team), scale.data(), shift.data()); });
}

// Backward: `sums(range, partial)` adds each channel's sum(dy) and sum(dy * (x - mean)) over the range's
// rows to partial[0, C) and partial[C, 2C); merged, they give the parameter gradients and the input
// gradient's coefficients, with which `grad_input(range, k_dy, k_xmu, k_const)` writes the range's dx.
template <typename T, typename Sums, typename GradInput>
void backward_by_rows(index_t rows, index_t C, double count, int threads, const T* invstd, const T* weight,
                      T* grad_weight, T* grad_bias, bool training, bool grad_wanted, Sums sums,
                      GradInput grad_input) {
  std::vector<double> partial(static_cast<size_t>(threads) * 2 * C, 0.0);
  if (training || grad_weight || grad_bias) {
    run_threads(threads, [&](int t, int team) { sums(share(rows, t, team), partial.data() + t * 2 * C); });
  }
  std::vector<T> k_dy(C), k_xmu(C), k_const(C);
  for (index_t c = 0; c < C; ++c) {
    double sum_dy = 0, sum_dy_xmu = 0;
    for (int t = 0; t < threads; ++t) {
      sum_dy += partial[t * 2 * C + c];
      sum_dy_xmu += partial[t * 2 * C + C + c];
    }
    if (grad_weight) grad_weight[c] = static_cast<T>(sum_dy_xmu * invstd[c]);
    if (grad_bias) grad_bias[c] = static_cast<T>(sum_dy);
    grad_coefficients(training, count, sum_dy, sum_dy_xmu, invstd[c],
                      weight ? static_cast<double>(weight[c]) : 1.0, k_dy[c], k_xmu[c], k_const[c]);
  }
  if (!grad_wanted) return;
  run_threads(threads, [&](int t, int team) {
    grad_input(share(rows, t, team), k_dy.data(), k_xmu.data(), k_const.data());
  });
}

// -- interleaved (M, C)

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
  forward_train_by_rows<T>(
      M, C, thread_count(M * C), weight, bias, save_mean, save_invstd, running_mean, running_var, momentum, eps,
      [&](RowRange r, Moments* acc) { accumulate_rows(x, C, r, acc); },
      [&](RowRange r, const T* scale, const T* shift) { normalize_rows(x, y, C, r, save_mean, scale, shift); });
}

template <typename T>
void forward_eval_interleaved(const T* x, T* y, index_t M, index_t C, const T* mean, const T* scale,
                              const T* shift) {
  run_threads(thread_count(M * C), [&](int t, int team) { normalize_rows(x, y, C, share(M, t, team), mean, scale, shift); });
}

// sum(dy) and sum(dy * (x - mean)) per channel over rows r, added into sums[0..C) and sums[C..2C).
template <typename T>
void grad_sums_rows(const T* x, const T* dy, index_t C, RowRange r, const T* mean, double* sums) {
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
      sums[c] += a[c];
      sums[C + c] += b[c];
    }
  }
}

template <typename T>
void backward_interleaved(const T* x, const T* dy, T* dx, index_t M, index_t C, const T* mean,
                          const T* invstd, const T* weight, T* grad_weight, T* grad_bias,
                          bool training) {
  backward_by_rows<T>(
      M, C, static_cast<double>(M), thread_count(M * C), invstd, weight, grad_weight, grad_bias, training,
      dx != nullptr, [&](RowRange r, double* sums) { grad_sums_rows(x, dy, C, r, mean, sums); },
      [&](RowRange r, const T* k_dy, const T* k_xmu, const T* k_const) {
        for (index_t m = r.begin; m < r.end; ++m) {
          const T* xr = x + m * C;
          const T* gr = dy + m * C;
          T* dr = dx + m * C;
#pragma omp simd
          for (index_t c = 0; c < C; ++c) dr[c] = gr[c] * k_dy[c] + (xr[c] - mean[c]) * k_xmu[c] + k_const[c];
        }
      });
}

// -- planar (N, C, S) split by batch

// Moments of every channel over samples [r.begin, r.end): each channel's shift is estimated from its
// plane in the first sample, and its lanes live across planes, as in the channel-split kernel.
template <typename T>
void accumulate_planes(const T* x, index_t C, index_t S, RowRange r, Moments* acc) {
  if (r.begin >= r.end) return;
  std::vector<LanePairs<T>> sums(C);
  std::vector<T> pivot(C);
  for (index_t c = 0; c < C; ++c) pivot[c] = first_estimate(x + (r.begin * C + c) * S, std::min(S, kBlockElements));
  for (index_t n = r.begin; n < r.end; ++n) {
    for (index_t c = 0; c < C; ++c) add_plane(x + (n * C + c) * S, S, sums[c], pivot[c], acc[c]);
  }
  for (index_t c = 0; c < C; ++c) flush_shifted(sums[c], pivot[c], acc[c]);
}

template <typename T>
void forward_train_planar_by_batch(const T* x, T* y, index_t N, index_t C, index_t S, const T* weight,
                                   const T* bias, T* save_mean, T* save_invstd, T* running_mean,
                                   T* running_var, double momentum, double eps) {
  forward_train_by_rows<T>(
      N, C, thread_count(N * C * S), weight, bias, save_mean, save_invstd, running_mean, running_var, momentum,
      eps, [&](RowRange r, Moments* acc) { accumulate_planes(x, C, S, r, acc); },
      [&](RowRange r, const T* scale, const T* shift) {
        for (index_t n = r.begin; n < r.end; ++n) {
          for (index_t c = 0; c < C; ++c) {
            const index_t offset = (n * C + c) * S;
            normalize_run(x + offset, y + offset, S, save_mean[c], scale[c], shift[c]);
          }
        }
      });
}

template <typename T>
void backward_planar_by_batch(const T* x, const T* dy, T* dx, index_t N, index_t C, index_t S, const T* mean,
                              const T* invstd, const T* weight, T* grad_weight, T* grad_bias, bool training) {
  backward_by_rows<T>(
      N, C, static_cast<double>(N * S), thread_count(N * C * S), invstd, weight, grad_weight, grad_bias, training,
      dx != nullptr,
      [&](RowRange r, double* sums) {
        std::vector<LanePairs<T>> lanes(C);
        for (index_t n = r.begin; n < r.end; ++n) {
          for (index_t c = 0; c < C; ++c) {
            const index_t offset = (n * C + c) * S;
            add_grad_plane(x + offset, dy + offset, S, mean[c], lanes[c], sums[c], sums[C + c]);
          }
        }
        for (index_t c = 0; c < C; ++c) lanes[c].take_into(sums[c], sums[C + c]);
      },
      [&](RowRange r, const T* k_dy, const T* k_xmu, const T* k_const) {
        for (index_t n = r.begin; n < r.end; ++n) {
          for (index_t c = 0; c < C; ++c) {
            const index_t offset = (n * C + c) * S;
            grad_input_run(x + offset, dy + offset, dx + offset, S, mean[c], k_dy[c], k_xmu[c], k_const[c]);
          }
        }
      });
}

// ---- dispatch on layout: S == 0 marks the interleaved layout (M = N rows).

// Planes of at most a page are split by batch (see the planar kernels). Measured on 2 threads, forward and
// backward, the channel split's median time over the batch split's (interleaved, about +-10%
// noise, 60-80 runs): on 16 shapes with planes of 196 B to 4 KB, 1.03x to 1.50x (LeNet's 256x6x24x24
// 1.23x, 256x16x8x8 1.16x), except 64x128x28x28 (0.91x to 0.97x in three runs) and one of two runs of
// 128x32x24x24 (0.96x; 1.21x in the other); on planes of 12.5 KB and 50 KB, 0.82x to 0.92x.
constexpr index_t kPageBytes = 4096;

template <typename T>
bool split_by_batch(index_t N, index_t C, index_t S) {
  const int threads = thread_count(N * C * S);
  return threads > 1 && (S * static_cast<index_t>(sizeof(T)) <= kPageBytes || C < threads);
}

template <typename T>
void forward_train(const T* x, T* y, index_t N, index_t C, index_t S, const T* weight, const T* bias,
                   T* save_mean, T* save_invstd, T* running_mean, T* running_var, double momentum,
                   double eps) {
  if (S == 0) {
    forward_train_interleaved(x, y, N, C, weight, bias, save_mean, save_invstd, running_mean,
                              running_var, momentum, eps);
  } else if (split_by_batch<T>(N, C, S)) {
    forward_train_planar_by_batch(x, y, N, C, S, weight, bias, save_mean, save_invstd, running_mean,
                                  running_var, momentum, eps);
  } else {
    forward_train_planar(x, y, N, C, S, weight, bias, save_mean, save_invstd, running_mean,
                         running_var, momentum, eps);
  }
}

// Inference: statistics given (running mean and variance); also saves the mean and inverse std that
// a backward needs, as training does.
template <typename T>
void forward_eval(const T* x, T* y, index_t N, index_t C, index_t S, const T* weight, const T* bias,
                  const T* mean, const T* var, T* save_mean, T* save_invstd, double eps) {
  std::vector<T> scale(C), shift(C);
  for (index_t c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt(static_cast<double>(var[c]) + eps);
    save_mean[c] = mean[c];
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
  } else if (split_by_batch<T>(N, C, S)) {
    backward_planar_by_batch(x, dy, dx, N, C, S, mean, invstd, weight, grad_weight, grad_bias, training);
  } else {
    backward_planar(x, dy, dx, N, C, S, mean, invstd, weight, grad_weight, grad_bias, training);
  }
}

}  // namespace

// ---- the torch operator -------------------------------------------------------------------------------

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The kernels' view of a tensor: planar (N, C, S) memory, or interleaved (M rows, C) memory marked by
// s == 0 (2D input and channels-last); any other layout is copied to contiguous first.
struct KernelView {
  Tensor x;
  index_t n, c, s;
};

KernelView kernel_view(const Tensor& input) {
  const index_t c = input.size(1);
  if (!input.is_contiguous()) {
    if (input.dim() > 2 && input.movedim(1, -1).is_contiguous()) return {input, input.numel() / c, c, 0};
    return kernel_view(input.contiguous());
  }
  const index_t n = input.size(0), spatial = input.numel() / (n * c);
  return {input, n, c, spatial > 1 ? spatial : 0};
}

// `t` with `like`'s strides (an expanded or differently laid out gradient), as the kernels read both.
Tensor in_layout_of(const Tensor& like, const Tensor& t) {
  return t.strides() == like.strides() ? t : at::empty_like(like).copy_(t);
}

template <typename T>
T* data_or_null(const std::optional<Tensor>& t) {
  return t && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check_arguments(const Tensor& input, std::initializer_list<const std::optional<Tensor>*> per_channel) {
  TORCH_CHECK(input.device().is_cpu(), "bnlab::batch_norm runs on CPU tensors, got ", input.device());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "bnlab::batch_norm takes float32 or float64, got ", input.scalar_type());
  TORCH_CHECK(input.dim() >= 2 && input.numel() > 0, "bnlab::batch_norm needs a non-empty (N, C, ...) input");
  for (const auto* t : per_channel) {
    if (*t && (*t)->defined()) {
      TORCH_CHECK((*t)->scalar_type() == input.scalar_type() && (*t)->is_contiguous() &&
                      (*t)->numel() == input.size(1) && (*t)->device().is_cpu(),
                  "bnlab::batch_norm: per-channel tensors must be contiguous, on CPU, of the input's dtype "
                  "and hold C values");
    }
  }
}

// Forward; `stats` receives a (2, C) tensor, (3, C) with `unbiased_in_stats`: the mean and the inverse standard deviation used, and
// (training, when `unbiased_in_stats`) the batch's unbiased variance. With `unbiased_in_stats` the
// running statistics are left alone: the kernel's running-variance update with momentum 1 writes the
// unbiased variance, computed in double from the exact moments, into row 2 instead, so that the
// functional operator can return it for the caller's own update.
Tensor forward_op(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                  const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                  bool training, double momentum, double eps, Tensor& stats, bool unbiased_in_stats = false) {
  check_arguments(input, {&weight, &bias, &running_mean, &running_var});
  TORCH_CHECK(training || (running_mean && running_mean->defined() && running_var && running_var->defined()),
              "bnlab::batch_norm needs running statistics in evaluation");
  const KernelView v = kernel_view(input);
  Tensor y = at::empty_like(v.x);
  stats = at::empty({unbiased_in_stats ? 3 : 2, v.c}, v.x.options());
  const bool update = training && !unbiased_in_stats;
  AT_DISPATCH_FLOATING_TYPES(v.x.scalar_type(), "bnlab::batch_norm", [&] {
    scalar_t* mean = stats.data_ptr<scalar_t>();
    // Row 2 is read by the update with momentum 1 too: (1 - 1) * garbage could be NaN.
    if (unbiased_in_stats) std::fill(mean + 2 * v.c, mean + 3 * v.c, scalar_t(0));
    if (training) {
      forward_train<scalar_t>(v.x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), v.n, v.c, v.s,
                              data_or_null<scalar_t>(weight), data_or_null<scalar_t>(bias), mean, mean + v.c,
                              update ? data_or_null<scalar_t>(running_mean) : nullptr,
                              update ? data_or_null<scalar_t>(running_var) : mean + 2 * v.c,
                              update ? momentum : 1.0, eps);
    } else {
      forward_eval<scalar_t>(v.x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), v.n, v.c, v.s,
                             data_or_null<scalar_t>(weight), data_or_null<scalar_t>(bias),
                             running_mean->data_ptr<scalar_t>(), running_var->data_ptr<scalar_t>(), mean,
                             mean + v.c, eps);
    }
  });
  if (update) {  // written through pointers: tell autograd, as an in-place op would
    for (const auto* t : {&running_mean, &running_var}) {
      if (*t && (*t)->defined()) torch::autograd::impl::bump_version(**t);
    }
  }
  return y;
}

// The hand-derived backward, by the kernels: (dx, dweight, dbias), each undefined when not needed.
variable_list backward_op(const Tensor& input, const Tensor& grad, const Tensor& weight, const Tensor& stats,
                          bool training, std::array<bool, 3> needs) {
  const KernelView v = kernel_view(input);
  const Tensor dy = in_layout_of(v.x, grad);
  Tensor dx = needs[0] ? at::empty_like(v.x) : Tensor();
  Tensor dw = needs[1] ? at::empty({v.c}, stats.options()) : Tensor();
  Tensor db = needs[2] ? at::empty({v.c}, stats.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(v.x.scalar_type(), "bnlab::batch_norm_backward", [&] {
    const scalar_t* mean = stats.data_ptr<scalar_t>();
    backward<scalar_t>(v.x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(),
                       dx.defined() ? dx.data_ptr<scalar_t>() : nullptr, v.n, v.c, v.s, mean, mean + v.c,
                       weight.defined() ? weight.data_ptr<scalar_t>() : nullptr,
                       dw.defined() ? dw.data_ptr<scalar_t>() : nullptr,
                       db.defined() ? db.data_ptr<scalar_t>() : nullptr, training);
  });
  return {dx, dw, db};
}

// The same backward in tensor ops, so that autograd can differentiate it (double backward, with
// create_graph): the formula of bnlab.functional.batch_norm.backward_torch. In training the statistics are
// recomputed from x, where autograd sees that they depend on it.
variable_list differentiable_backward(const Tensor& x, const Tensor& dy, const Tensor& weight, const Tensor& stats,
                                      bool training, double eps, std::array<bool, 3> needs) {
  std::vector<int64_t> dims{0}, shape(x.dim(), 1);
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  shape[1] = x.size(1);
  Tensor mean = stats[0], invstd = stats[1];
  if (training) {
    auto [var, batch_mean] = at::var_mean(x, dims, std::optional<at::Scalar>(0), /*keepdim=*/false);
    mean = batch_mean;
    invstd = (var + eps).rsqrt();
  }
  const Tensor x_hat = (x - mean.view(shape)) * invstd.view(shape);
  const Tensor sum_dy = dy.sum(dims), sum_dy_xhat = (dy * x_hat).sum(dims);
  Tensor dx;
  if (needs[0]) {
    const Tensor scale = weight.defined() ? invstd * weight : invstd;
    Tensor centered = dy;
    if (training) {
      const double count = static_cast<double>(x.numel() / x.size(1));
      centered = dy - (sum_dy / count).view(shape) - x_hat * (sum_dy_xhat / count).view(shape);
    }
    dx = centered * scale.view(shape);
  }
  return {dx, needs[1] ? sum_dy_xhat : Tensor(), needs[2] ? sum_dy : Tensor()};
}

// What both autograd functions keep for backward: the input, the weight, the (mean, inverse std) stats,
// the mode and eps, and which of weight and bias were passed.
void save_for_backward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
                       const std::optional<Tensor>& bias, const Tensor& stats, bool training, double eps) {
  ctx->save_for_backward({input, weight.value_or(Tensor()), stats});
  ctx->saved_data["training"] = training;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["has_weight"] = weight.has_value() && weight->defined();
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
}

struct Saved {
  variable_list tensors;  // input, weight (undefined when absent), stats
  bool training;
  std::array<bool, 3> needs;  // which of (input, weight, bias) need a gradient
};

// needs_input_grad counts autograd edges, and only a tensor that is present has one: an absent weight
// shifts the bias to edge 1.
Saved restore(AutogradContext* ctx) {
  const bool present[3] = {true, ctx->saved_data["has_weight"].toBool(), ctx->saved_data["has_bias"].toBool()};
  Saved saved{ctx->get_saved_variables(), ctx->saved_data["training"].toBool(), {}};
  for (size_t i = 0, edge = 0; i < 3; ++i) saved.needs[i] = present[i] && ctx->needs_input_grad(edge++);
  return saved;
}

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
                        const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                        const std::optional<Tensor>& running_var, bool training, double momentum, double eps) {
    Tensor stats;
    Tensor y = forward_op(input, weight, bias, running_mean, running_var, training, momentum, eps, stats);
    save_for_backward(ctx, input, weight, bias, stats, training, eps);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [saved, training, needs] = restore(ctx);
    variable_list g = at::GradMode::is_enabled()
                          ? differentiable_backward(saved[0], grads[0], saved[1], saved[2], training,
                                                    ctx->saved_data["eps"].toDouble(), needs)
                          : backward_op(saved[0], grads[0], saved[1], saved[2], training, needs);
    return {g[0], g[1], g[2], Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor batch_norm(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                  const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                  bool training, double momentum, double eps) {
  return BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training, momentum, eps);
}

// ---- the functional operators, for graphs (torch.compile, torch.export) -------------------------------
// Pure functions of their inputs: bnlab/kernels.py registers their fake kernels (shapes without data),
// and ForwardFunction below is batch_norm_forward's autograd (forward, then batch_norm_backward), as
// torch's custom-operator contract asks. The running statistics are not touched: forward returns the batch's
// mean and unbiased variance in `stats`, and the caller updates them with tensor ops the graph sees.

std::tuple<Tensor, Tensor> batch_norm_forward(const Tensor& input, const std::optional<Tensor>& weight,
                                              const std::optional<Tensor>& bias,
                                              const std::optional<Tensor>& running_mean,
                                              const std::optional<Tensor>& running_var, bool training,
                                              double eps) {
  Tensor stats;
  Tensor y = forward_op(input, weight, bias, running_mean, running_var, training, 1.0, eps, stats,
                        /*unbiased_in_stats=*/true);
  return {y, stats};
}

// (dx, dweight, dbias); dx is an empty tensor when `input_grad` is false. dweight and dbias are always
// computed: in training their sums are needed for dx anyway, and they cost one pass otherwise.
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad, const Tensor& input,
                                                       const std::optional<Tensor>& weight, const Tensor& stats,
                                                       bool training, bool input_grad) {
  const variable_list g =
      backward_op(input, grad, weight.value_or(Tensor()), stats, training, {input_grad, true, true});
  return {input_grad ? g[0] : at::empty({0}, input.options()), g[1], g[2]};
}

// The functional forward's autograd, in C++ for the reason the eager operator's is: a compiled graph
// calls the operator on every step, and the kernel torch.library.register_autograd installs runs in
// Python, about 10 us a call. The forward calls the operator again below autograd, through the
// dispatcher, so that a tracer (torch.compile's fake tensors, torch.export) records it; so does the
// backward, with batch_norm_backward, unless grad mode asks for a differentiable (double) backward.
struct ForwardFunction : public torch::autograd::Function<ForwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                               const std::optional<Tensor>& running_var, bool training, double eps) {
    auto [y, stats] = below_autograd(input, weight, bias, running_mean, running_var, training, eps);
    ctx->mark_non_differentiable({stats});
    save_for_backward(ctx, input, weight, bias, stats, training, eps);
    return {y, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [saved, training, needs] = restore(ctx);
    variable_list g;
    if (at::GradMode::is_enabled()) {
      g = differentiable_backward(saved[0], grads[0], saved[1], saved[2], training,
                                  ctx->saved_data["eps"].toDouble(), needs);
    } else {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("bnlab::batch_norm_backward", "")
                                 .typed<decltype(batch_norm_backward)>();
      const std::optional<Tensor> weight = saved[1].defined() ? std::optional<Tensor>(saved[1]) : std::nullopt;
      auto [dx, dw, db] = op.call(grads[0], saved[0], weight, saved[2], training, needs[0]);
      g = {needs[0] ? dx : Tensor(), needs[1] ? dw : Tensor(), needs[2] ? db : Tensor()};
    }
    return {g[0], g[1], g[2], Tensor(), Tensor(), Tensor(), Tensor()};
  }

  static std::tuple<Tensor, Tensor> below_autograd(const Tensor& input, const std::optional<Tensor>& weight,
                                                   const std::optional<Tensor>& bias,
                                                   const std::optional<Tensor>& running_mean,
                                                   const std::optional<Tensor>& running_var, bool training,
                                                   double eps) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bnlab::batch_norm_forward", "")
                               .typed<decltype(batch_norm_forward)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias, running_mean, running_var, training, eps);
  }
};

bool requires_grad(const std::optional<Tensor>& t) { return t && t->defined() && t->requires_grad(); }

std::tuple<Tensor, Tensor> batch_norm_forward_autograd(const Tensor& input, const std::optional<Tensor>& weight,
                                                       const std::optional<Tensor>& bias,
                                                       const std::optional<Tensor>& running_mean,
                                                       const std::optional<Tensor>& running_var, bool training,
                                                       double eps) {
  // Inside a compiled graph's forward grad mode is off: skip building an autograd node.
  if (!at::GradMode::is_enabled() || !(input.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    return ForwardFunction::below_autograd(input, weight, bias, running_mean, running_var, training, eps);
  }
  variable_list out = ForwardFunction::apply(input, weight, bias, running_mean, running_var, training, eps);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY(bnlab, m) {
  m.def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, bool training, float momentum, float eps) -> Tensor");
  m.def("batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
        "Tensor? running_var, bool training, float eps) -> (Tensor, Tensor)");
  m.def("batch_norm_backward(Tensor grad, Tensor input, Tensor? weight, Tensor stats, bool training, "
        "bool input_grad) -> (Tensor, Tensor, Tensor)");
  m.def("max_threads() -> int", [] { return static_cast<int64_t>(omp_get_max_threads()); });
}

// bnlab::batch_norm is CompositeImplicitAutograd: the kernel runs for every call, and the autograd
// function inside it records its own node, so autograd never looks into the kernels. It is the eager
// path, where a C++ autograd node costs microseconds less than anything registered from Python.
TORCH_LIBRARY_IMPL(bnlab, CompositeImplicitAutograd, m) { m.impl("batch_norm", batch_norm); }

TORCH_LIBRARY_IMPL(bnlab, CPU, m) {
  m.impl("batch_norm_forward", batch_norm_forward);
  m.impl("batch_norm_backward", batch_norm_backward);
}

TORCH_LIBRARY_IMPL(bnlab, Autograd, m) { m.impl("batch_norm_forward", batch_norm_forward_autograd); }
