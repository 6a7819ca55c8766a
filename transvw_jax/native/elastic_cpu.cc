// TransVW's elastic deformation (x/y displacement, bilinear sampling, scipy's 'reflect'
// edges) as one XLA FFI custom call on the CPU.
//
// Why: XLA:CPU emits the four data-dependent gathers of the bilinear sampling as a scalar
// loop, and writes the full-size displacement field (a rank-r_z matmul) to memory before
// reading it back: together most of the TransVW policy's time on a CPU
// (benchmarks/RESULTS.md). Here the field is evaluated voxel by voxel from its
// low-rank factors (never stored), the index and blend arithmetic runs on vectors along z
// (contiguous in memory), and the four taps of a voxel come from one 16-byte load out of a
// per-cube "tap pack" (see build_pack). The arithmetic is that of transforms/elastic.py's
// pure-JAX path, which stays the definition (and the accelerators' implementation); the
// tests compare the two.
//
// Operands, all float32 (transforms/elastic.py's `_field_factors`):
//   x     (..., X, Y, Z)            cubes
//   core  (..., 2, RX, RY, RZ)      each cube's random core of its two displacement fields
//   bx, by, bz  (X, RX), (Y, RY), (Z, RZ)   the smoothing bases, shared by all cubes (any
//                                   leading dimensions of size 1, as vmap passes them)
// d_f(i, j, k) = sum_abc core[f, a, b, c] bx[i, a] by[j, b] bz[k, c]; the result
// (..., X, Y, Z) is x sampled at (i + d_0, j + d_1, k).
// Cubes are shared out over XLA's own intra-op thread pool; each worker keeps one tap pack
// (16 bytes per voxel of a cube) for the cubes it handles.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <condition_variable>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRank = 64;
// Voxels per chunk: one register per quantity, 512, 256 or 128 bits (vectors wider than
// the registers turn the tap transposes into memory shuffles, several times slower:
// benchmarks/RESULTS.md).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef float v4 __attribute__((vector_size(16)));
typedef float v8 __attribute__((vector_size(32)));

vi lane_numbers() {
  vi lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = l;
  return lane;
}
const vi lane = lane_numbers();

v4 load4(const float* pack, int32_t index) {
  v4 t;
  std::memcpy(&t, pack + 4 * static_cast<int64_t>(index), sizeof(v4));
  return t;
}

// The taps of kLanes voxels: one 16-byte load per voxel, assembled in registers into
// voxel-major vectors, then transposed to one vector per tap (v00, v01, v10, v11).
void load_taps(const float* pack, const int32_t* idx, vf& v00, vf& v01, vf& v10, vf& v11) {
#if defined(__AVX512F__)
  vf q[4];  // q[h]: voxels 4h .. 4h + 3, four taps each
  for (int h = 0; h < 4; ++h) {
    const v8 lo = __builtin_shufflevector(load4(pack, idx[4 * h]), load4(pack, idx[4 * h + 1]), 0, 1, 2, 3, 4, 5,
                                          6, 7);
    const v8 hi = __builtin_shufflevector(load4(pack, idx[4 * h + 2]), load4(pack, idx[4 * h + 3]), 0, 1, 2, 3,
                                          4, 5, 6, 7);
    q[h] = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  // e0, e1: taps (0, 1) and (2, 3) of voxels 0-7; e2, e3: the same of voxels 8-15.
  const vf e0 = __builtin_shufflevector(q[0], q[1], 0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const vf e1 = __builtin_shufflevector(q[0], q[1], 2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
  const vf e2 = __builtin_shufflevector(q[2], q[3], 0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const vf e3 = __builtin_shufflevector(q[2], q[3], 2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
  v00 = __builtin_shufflevector(e0, e2, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  v01 = __builtin_shufflevector(e0, e2, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  v10 = __builtin_shufflevector(e1, e3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  v11 = __builtin_shufflevector(e1, e3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
#elif defined(__AVX__)
  vf q[4];  // q[h]: voxels 2h, 2h + 1, four taps each
  for (int h = 0; h < 4; ++h)
    q[h] = __builtin_shufflevector(load4(pack, idx[2 * h]), load4(pack, idx[2 * h + 1]), 0, 1, 2, 3, 4, 5, 6, 7);
  // e0, e1: taps (0, 1) and (2, 3) of voxels 0-3; e2, e3: the same of voxels 4-7.
  const vf e0 = __builtin_shufflevector(q[0], q[1], 0, 4, 8, 12, 1, 5, 9, 13);
  const vf e1 = __builtin_shufflevector(q[0], q[1], 2, 6, 10, 14, 3, 7, 11, 15);
  const vf e2 = __builtin_shufflevector(q[2], q[3], 0, 4, 8, 12, 1, 5, 9, 13);
  const vf e3 = __builtin_shufflevector(q[2], q[3], 2, 6, 10, 14, 3, 7, 11, 15);
  v00 = __builtin_shufflevector(e0, e2, 0, 1, 2, 3, 8, 9, 10, 11);
  v01 = __builtin_shufflevector(e0, e2, 4, 5, 6, 7, 12, 13, 14, 15);
  v10 = __builtin_shufflevector(e1, e3, 0, 1, 2, 3, 8, 9, 10, 11);
  v11 = __builtin_shufflevector(e1, e3, 4, 5, 6, 7, 12, 13, 14, 15);
#else
  vf q[4];  // q[h]: voxel h, four taps
  for (int h = 0; h < 4; ++h) q[h] = load4(pack, idx[h]);
  const vf e0 = __builtin_shufflevector(q[0], q[1], 0, 4, 1, 5), e1 = __builtin_shufflevector(q[0], q[1], 2, 6, 3, 7);
  const vf e2 = __builtin_shufflevector(q[2], q[3], 0, 4, 1, 5), e3 = __builtin_shufflevector(q[2], q[3], 2, 6, 3, 7);
  v00 = __builtin_shufflevector(e0, e2, 0, 1, 4, 5);
  v01 = __builtin_shufflevector(e0, e2, 2, 3, 6, 7);
  v10 = __builtin_shufflevector(e1, e3, 0, 1, 4, 5);
  v11 = __builtin_shufflevector(e1, e3, 2, 3, 6, 7);
#endif
}

// scipy's 'reflect' (d c b a | a b c d | d c b a) for any integer index.
inline int32_t reflect_any(int32_t i, int32_t n) {
  int32_t m = i % (2 * n);
  if (m < 0) m += 2 * n;
  return m >= n ? 2 * n - 1 - m : m;
}

// The four taps of a bilinear sample, (x[p, q], x[p, q'], x[p', q], x[p', q']) with p' =
// reflect(p + 1), q' = reflect(q + 1), side by side for every voxel (p, q, k): a cube's
// "tap pack", 4x its size. One 16-byte load then fetches all four taps of a voxel, where
// the plain layout needs four scattered loads (vector gathers were no faster than those
// where measured); building the pack costs less than it saves (benchmarks/RESULTS.md).
void build_pack(const float* __restrict x, int64_t sx, int64_t sy, int64_t sz, float* __restrict pack) {
  for (int64_t i = 0; i < sx; ++i)
    for (int64_t j = 0; j < sy; ++j) {
      const int64_t i1 = i + 1 < sx ? i + 1 : sx - 1, j1 = j + 1 < sy ? j + 1 : sy - 1;
      const float *a = x + (i * sy + j) * sz, *b = x + (i * sy + j1) * sz;
      const float *c = x + (i1 * sy + j) * sz, *d = x + (i1 * sy + j1) * sz;
      float* p = pack + 4 * (i * sy + j) * sz;
      for (int64_t k = 0; k < sz; ++k) {
        p[4 * k] = a[k];
        p[4 * k + 1] = b[k];
        p[4 * k + 2] = c[k];
        p[4 * k + 3] = d[k];
      }
    }
}

// The bases of one call: bx as given, by and bz transposed to (RY, Y) and (RZ, Z + pad) so that
// the inner loops over y and z read them contiguously, and each z component's largest
// magnitude, which bounds a row's displacement.
struct Bases {
  int64_t sx, sy, sz, szp, rx, ry, rz;  // szp: sz rounded up to whole chunks of kLanes
  const float* bx;
  std::vector<float> by_t, bz_t, bz_absmax;
  Bases(const float* bx, const float* by, const float* bz, int64_t sx, int64_t sy, int64_t sz, int64_t rx,
        int64_t ry, int64_t rz)
      : sx(sx), sy(sy), sz(sz), szp((sz + kLanes - 1) / kLanes * kLanes), rx(rx), ry(ry), rz(rz), bx(bx),
        by_t(ry * sy), bz_t(rz * szp, 0.f), bz_absmax(rz, 0.f) {
    for (int64_t b = 0; b < ry; ++b)
      for (int64_t j = 0; j < sy; ++j) by_t[b * sy + j] = by[j * ry + b];
    for (int64_t c = 0; c < rz; ++c)
      for (int64_t k = 0; k < sz; ++k) {
        bz_t[c * szp + k] = bz[k * rz + c];
        bz_absmax[c] = std::max(bz_absmax[c], std::fabs(bz[k * rz + c]));
      }
  }
};

// Per-thread buffers, reused from cube to cube.
struct Scratch {
  std::vector<float> pack, field_yz;  // the cube's tap pack; the row's (2, RZ, Y) field factors
};

// Base index and weight on one axis for the taps (a, b) = (reflect(i0), reflect(i0 + 1)):
// the pack pairs p with reflect(p + 1), so the sample (1 - f) x[a] + f x[b] is
// (1 - w) x[p] + w x[p'] with p = min(a, b) and w = f, 1 - f or 0 (a == b at an edge).
inline void pair_of(int32_t a, int32_t b, float f, int32_t& p, float& w) {
  p = a < b ? a : b;
  w = b > a ? f : (b < a ? 1.f - f : 0.f);
}

// One x-row (fixed cube and i) of the output: Y * Z voxels, from the cube's tap pack.
void sample_row(const Bases& g, const float* pack, const float* core, float* field_yz, float* out, int64_t i) {
  const int32_t nx = static_cast<int32_t>(g.sx), ny = static_cast<int32_t>(g.sy);
  const int32_t zs = static_cast<int32_t>(g.sz);
  const int64_t sy = g.sy, sz = g.sz, rz = g.rz, ry = g.ry, rx = g.rx;
  // The core contracted with bx[i], (2, RY, RZ), then with by for every j: (2, RZ, Y).
  alignas(64) float t[2 * kMaxRank * kMaxRank];
  for (int64_t q = 0; q < 2 * ry * rz; ++q) t[q] = 0.f;
  for (int64_t f = 0; f < 2; ++f)
    for (int64_t a = 0; a < rx; ++a) {
      const float w = g.bx[i * rx + a];
      const float* c_fa = core + (f * rx + a) * ry * rz;
      for (int64_t q = 0; q < ry * rz; ++q) t[f * ry * rz + q] += w * c_fa[q];
    }
  for (int64_t q = 0; q < 2 * rz * sy; ++q) field_yz[q] = 0.f;
  for (int64_t f = 0; f < 2; ++f)
    for (int64_t b = 0; b < ry; ++b)
      for (int64_t c = 0; c < rz; ++c) {
        const float w = t[(f * ry + b) * rz + c];
        const float* by = g.by_t.data() + b * sy;
        float* dst = field_yz + (f * rz + c) * sy;
        for (int64_t j = 0; j < sy; ++j) dst[j] += w * by[j];
      }
  float* dst = out + i * sy * sz;
  const float fi = static_cast<float>(i);
  for (int64_t j = 0; j < sy; ++j) {
    const float* a_j = field_yz + j;            // stride sy: this (i, j)'s z components of d_x
    const float* b_j = field_yz + rz * sy + j;  // ... and of d_y
    float bound_x = 0.f, bound_y = 0.f;
    for (int64_t c = 0; c < rz; ++c) {
      bound_x += std::fabs(a_j[c * sy]) * g.bz_absmax[c];
      bound_y += std::fabs(b_j[c * sy]) * g.bz_absmax[c];
    }
    // The fast loop folds an out-of-range index once, which holds for coordinates in
    // [-n + 1, 2n - 1); a row whose displacement bound says it may leave that range takes
    // the exact modular reflection (1 extra voxel of margin for rounding).
    const float fj = static_cast<float>(j);
    const bool far = fi - bound_x < 2.f - nx || fi + bound_x >= 2.f * nx - 2.f || fj - bound_y < 2.f - ny ||
                     fj + bound_y >= 2.f * ny - 2.f;
    float* row = dst + j * sz;
    // Chunks of kLanes voxels along z, computed as GCC vectors; lanes past the end of z
    // (bz_t is zero-padded there) read the last voxel and are not stored.
    for (int64_t k0 = 0; k0 < sz; k0 += kLanes) {
      vf dx = {}, dy = {};
      for (int64_t c = 0; c < rz; ++c) {
        vf bc;
        std::memcpy(&bc, g.bz_t.data() + c * g.szp + k0, sizeof(vf));
        dx += a_j[c * sy] * bc;
        dy += b_j[c * sy] * bc;
      }
      const vf cx = fi + dx, cy = fj + dy;
      const vi tx = __builtin_convertvector(cx, vi), ty = __builtin_convertvector(cy, vi);
      // floor: truncation, minus one where that rounded up (negative non-integers).
      const vi x0 = tx + (cx < __builtin_convertvector(tx, vf)), y0 = ty + (cy < __builtin_convertvector(ty, vf));
      const vf fx = cx - __builtin_convertvector(x0, vf), fy = cy - __builtin_convertvector(y0, vf);
      vi ax, bx, ay, by;
      if (!far) {
        ax = x0 < 0 ? -1 - x0 : (x0 >= nx ? 2 * nx - 1 - x0 : x0);
        bx = x0 + 1 < 0 ? -2 - x0 : (x0 + 1 >= nx ? 2 * nx - 2 - x0 : x0 + 1);
        ay = y0 < 0 ? -1 - y0 : (y0 >= ny ? 2 * ny - 1 - y0 : y0);
        by = y0 + 1 < 0 ? -2 - y0 : (y0 + 1 >= ny ? 2 * ny - 2 - y0 : y0 + 1);
      } else {
        for (int l = 0; l < kLanes; ++l) {
          ax[l] = reflect_any(x0[l], nx);
          bx[l] = reflect_any(x0[l] + 1, nx);
          ay[l] = reflect_any(y0[l], ny);
          by[l] = reflect_any(y0[l] + 1, ny);
        }
      }
      // pair_of, lane-wise.
      const vi px = ax < bx ? ax : bx, py = ay < by ? ay : by;
      const vf zero = {};
      const vf wx = bx > ax ? fx : (bx < ax ? 1.f - fx : zero);
      const vf wy = by > ay ? fy : (by < ay ? 1.f - fy : zero);
      vi k = lane + static_cast<int32_t>(k0);
      k = k < zs ? k : zs - 1;
      alignas(64) int32_t idx[kLanes];
      const vi flat = (px * ny + py) * zs + k;
      std::memcpy(idx, &flat, sizeof(vi));
      vf v00, v01, v10, v11;
      load_taps(pack, idx, v00, v01, v10, v11);
      const vf res = (1.f - wx) * ((1.f - wy) * v00 + wy * v01) + wx * ((1.f - wy) * v10 + wy * v11);
      if (sz - k0 >= kLanes)
        std::memcpy(row + k0, &res, sizeof(vf));
      else
        for (int64_t l = 0; l < sz - k0; ++l) row[k0 + l] = res[l];
    }
  }
}

// One cube: its tap pack, then its rows.
void sample_cube(const Bases& g, const float* x, const float* core, float* out) {
  thread_local Scratch scratch;
  scratch.pack.resize(4 * g.sx * g.sy * g.sz);
  scratch.field_yz.resize(2 * g.rz * g.sy);
  build_pack(x, g.sx, g.sy, g.sz, scratch.pack.data());
  for (int64_t i = 0; i < g.sx; ++i) sample_row(g, scratch.pack.data(), core, scratch.field_yz.data(), out, i);
}

// Runs body(t) for t in [0, n) on the caller and XLA's intra-op pool. The caller takes
// work too and waits only for tasks that were started, so it finishes even when the pool
// never runs what was scheduled (the FFI makes no promise that it will, or in parallel);
// a task that starts after the call returned finds no work and touches nothing else.
// Returns false if a task threw (e.g. std::bad_alloc for a tap pack).
template <typename F>
bool parallel_for(ffi::ThreadPool& pool, int64_t n, F body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<bool> failed{false};
    int64_t n;
    std::mutex mu;
    std::condition_variable cv;
    int64_t done = 0;
    F body;
    State(int64_t n, F body) : n(n), body(std::move(body)) {}
    void run() {
      int64_t mine = 0;
      for (int64_t t; (t = next.fetch_add(1)) < n; ++mine) {
        try {
          if (!failed) body(t);
        } catch (...) {
          failed = true;
        }
      }
      if (mine) {
        std::lock_guard<std::mutex> lock(mu);
        done += mine;
        if (done == n) cv.notify_all();
      }
    }
  };
  auto state = std::make_shared<State>(n, std::move(body));
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state] { state->run(); });
  state->run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->n; });
  return !state->failed;
}

// The product of dims [from, to) of a shape.
template <typename Dims>
int64_t product(const Dims& d, size_t from, size_t to) {
  int64_t p = 1;
  for (size_t q = from; q < to; ++q) p *= d[q];
  return p;
}

// Flat index, in an operand with leading dimensions `dims` (each the output's or 1, as
// vmap's "expand_dims" passes an unbatched operand), of the output's cube number `c`.
template <typename Dims, typename OutDims>
int64_t broadcast_index(const Dims& dims, const OutDims& out_dims, size_t lead, int64_t c) {
  int64_t index = 0, stride = 1;
  for (size_t d = lead; d-- > 0;) {
    const int64_t i = c % out_dims[d];
    c /= out_dims[d];
    if (dims[d] != 1) index += i * stride;
    stride *= dims[d];
  }
  return index;
}

ffi::Error ElasticImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> core,
                       ffi::Buffer<ffi::F32> bx, ffi::Buffer<ffi::F32> by, ffi::Buffer<ffi::F32> bz,
                       ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), cd = core.dimensions(), od = out->dimensions();
  if (xd.size() < 3 || cd.size() != xd.size() + 1 || od.size() != xd.size())
    return ffi::Error::InvalidArgument("elastic: x must be (..., X, Y, Z) and core (..., 2, RX, RY, RZ)");
  const size_t lead = xd.size() - 3;
  for (size_t d = 0; d < lead; ++d)
    if ((xd[d] != od[d] && xd[d] != 1) || (cd[d] != od[d] && cd[d] != 1))
      return ffi::Error::InvalidArgument("elastic: batch dimensions of x and core differ");
  for (size_t d = lead; d < xd.size(); ++d)
    if (xd[d] != od[d]) return ffi::Error::InvalidArgument("elastic: the result's cube shape differs from x's");
  const int64_t batch = product(od, 0, lead), sx = xd[lead], sy = xd[lead + 1], sz = xd[lead + 2];
  const int64_t rx = cd[lead + 1], ry = cd[lead + 2], rz = cd[lead + 3];
  const ffi::Buffer<ffi::F32>* bases[3] = {&bx, &by, &bz};
  const int64_t sizes[3] = {sx, sy, sz}, ranks[3] = {rx, ry, rz};
  for (int a = 0; a < 3; ++a) {
    auto d = bases[a]->dimensions();
    if (d.size() < 2 || product(d, 0, d.size() - 2) != 1 || d[d.size() - 2] != sizes[a] ||
        d[d.size() - 1] != ranks[a])
      return ffi::Error::InvalidArgument("elastic: bases must be (X, RX), (Y, RY), (Z, RZ), shared by all cubes");
  }
  if (cd[lead] != 2) return ffi::Error::InvalidArgument("elastic: core must hold 2 fields");
  if (rx > kMaxRank || ry > kMaxRank || rz > kMaxRank)
    return ffi::Error::InvalidArgument("elastic: a smoothing rank above " + std::to_string(kMaxRank));
  if (sx * sy * sz >= (int64_t{1} << 31))
    return ffi::Error::InvalidArgument("elastic: cube too large for 32-bit indices");
  try {
    const Bases g(bx.typed_data(), by.typed_data(), bz.typed_data(), sx, sy, sz, rx, ry, rz);
    const float *xp = x.typed_data(), *cp = core.typed_data();
    float* op = out->typed_data();
    const int64_t cube_size = sx * sy * sz, core_size = 2 * rx * ry * rz;
    // One task per cube (each builds its own tap pack).
    const bool ok = parallel_for(pool, batch, [&](int64_t c) {
      sample_cube(g, xp + broadcast_index(xd, od, lead, c) * cube_size,
                  cp + broadcast_index(cd, od, lead, c) * core_size, op + c * cube_size);
    });
    if (!ok) return ffi::Error::Internal("elastic: a worker failed (out of memory for the tap pack?)");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("elastic: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransvwElastic, ElasticImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
