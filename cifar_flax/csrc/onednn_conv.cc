// oneDNN 2-D convolutions (NHWC activations, HWIO kernels, float32 or bfloat16) as XLA FFI
// handlers for the CPU: forward, input gradient and kernel gradient, called from cifar_flax/models/onednn.py
// through jax.ffi.ffi_call. oneDNN is the library PyTorch and TF-Keras run their CPU
// convolutions on; XLA:CPU's own convolution and the matmul-based forms in layers.py are slower
// on wide layers with large maps (docs/performance.md).
//
// Built and run against oneDNN 2.6 (Debian 12's libdnnl-dev), the project's route; the 3.x
// constructors of the primitive descriptors against 3.13 from PyPI (tools/onednn3_check.sh: the
// tests pass; that build trains slower, its threads the SYCL runtime's, not the OpenMP ones below).
// Each handler builds its primitive for the shapes it is called with, once (CachedPlan), keyed
// by shapes, attributes and thread count. Weights are reordered to and from the blocked
// layout oneDNN chooses ("any"); activations stay NHWC, as in PyTorch's channels-last mode.
// A call may split its batch into pieces that XLA's idle threads take (RunPieces).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Each call passes its own scratch memory (ThreadMemory): oneDNN's default ("library" mode) is
// shared between primitives, and a GoogLeNet step, whose branches XLA runs on two threads at
// once, hung in it.
dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// oneDNN's OpenMP threads: all of them (OMP_NUM_THREADS, else one a core), read when the library
// loads, or one, as each call asks. Each piece of a call sets the count on the thread it runs on
// (ForEachPiece) before its primitive is built (oneDNN plans its work for the thread count it
// sees then) and before it runs: layers XLA runs beside others (GoogLeNet's branches) ask for one.
const int kAllThreads = omp_get_max_threads();

int ThreadsFor(int64_t requested) { return requested == 1 ? 1 : kAllThreads; }

// (N, H, W, C) activations, (KH, KW, C, K) kernel, strides, pads (top, left, bottom, right), and
// the data types of the source and destination activations (float32 or bfloat16; a result may be
// float32 where the operands are bfloat16) and of the weights (the operands' type; float32 for a
// kernel gradient, accumulated so), in XLA's HWIO buffer and in the primitive's layout alike.
// ``operands`` is the type of the call's activation operands.
struct ConvShape {
  int64_t n, h, w, c, oh, ow, k, kh, kw, sh, sw, pt, pl, pb, pr, threads;
  dt src = dt::f32, dst = dt::f32, weights = dt::f32, operands = dt::f32;
  auto Key() const {
    return std::make_tuple(n, h, w, c, oh, ow, k, kh, kw, sh, sw, pt, pl, pb, pr, threads, static_cast<int>(src),
                           static_cast<int>(dst), static_cast<int>(weights));
  }
  memory::desc Src() const { return memory::desc({n, c, h, w}, src, tag::nhwc); }
  memory::desc Dst() const { return memory::desc({n, k, oh, ow}, dst, tag::nhwc); }
  memory::desc WeightsAny() const { return memory::desc({k, c, kh, kw}, weights, tag::any); }
  memory::desc WeightsHwio() const { return memory::desc({k, c, kh, kw}, weights, tag::hwio); }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadLo() const { return {pt, pl}; }
  memory::dims PadHi() const { return {pb, pr}; }
  // This shape's activations in a call's buffer, from its image ``first`` on (a piece's).
  memory SrcAt(void* data, int64_t first) const {
    return memory(Src(), Engine(), static_cast<char*>(data) + first * h * w * c * Bytes(src));
  }
  memory DstAt(void* data, int64_t first) const {
    return memory(Dst(), Engine(), static_cast<char*>(data) + first * oh * ow * k * Bytes(dst));
  }
  memory Hwio(void* data) const { return memory(WeightsHwio(), Engine(), data); }
  // The forward convolution of the operands' type, a backward primitive's hint.
  ConvShape Hint() const {
    ConvShape hint = *this;
    hint.src = hint.dst = hint.weights = operands;
    return hint;
  }
  static size_t Bytes(dt type) { return type == dt::bf16 ? 2 : 4; }
};

// The primitive descriptors, in oneDNN 2.x's API (an operation descriptor first) or 3.x's.
dnnl::convolution_forward::primitive_desc ForwardPd(const ConvShape& s) {
#if DNNL_VERSION_MAJOR >= 3
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, s.Src(),
      s.WeightsAny(), s.Dst(), s.Strides(), s.PadLo(), s.PadHi(), Attr());
#else
  auto desc = dnnl::convolution_forward::desc(
      dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, s.Src(),
      s.WeightsAny(), s.Dst(), s.Strides(), s.PadLo(), s.PadHi());
  return dnnl::convolution_forward::primitive_desc(desc, Attr(), Engine());
#endif
}

// convolution_backward_data (input gradient) or convolution_backward_weights (kernel gradient):
// their descriptors take the same arguments in the same places.
template <typename Backward>
typename Backward::primitive_desc BackwardPd(const ConvShape& s) {
#if DNNL_VERSION_MAJOR >= 3
  return typename Backward::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, s.Src(), s.WeightsAny(), s.Dst(), s.Strides(),
      s.PadLo(), s.PadHi(), ForwardPd(s.Hint()), Attr());
#else
  typename Backward::desc desc(
      dnnl::algorithm::convolution_direct, s.Src(), s.WeightsAny(), s.Dst(), s.Strides(), s.PadLo(), s.PadHi());
  return typename Backward::primitive_desc(desc, Attr(), Engine(), ForwardPd(s.Hint()));
#endif
}

// Everything one call needs, built once per shape.
struct Plan {
  dnnl::primitive conv;
  memory::desc scratchpad;
  memory::desc weights;  // the layout the primitive wants
  bool has_reorder = false;  // HWIO <-> that layout
  dnnl::reorder reorder;
  memory::desc reorder_scratchpad;
};

template <typename PrimitiveDesc>
Plan MakePlan(const dnnl::primitive& conv, const PrimitiveDesc& pd, const memory::desc& weights,
              const ConvShape& s, bool weights_in) {
  Plan plan{conv, pd.scratchpad_desc(), weights};
  plan.has_reorder = weights != s.WeightsHwio();
  if (plan.has_reorder) {
    auto from = weights_in ? s.WeightsHwio() : weights, to = weights_in ? weights : s.WeightsHwio();
    auto reorder_pd = dnnl::reorder::primitive_desc(Engine(), from, Engine(), to, Attr());
    plan.reorder = dnnl::reorder(reorder_pd);
    plan.reorder_scratchpad = reorder_pd.scratchpad_desc();
  }
  return plan;
}

template <typename Build>
const Plan& CachedPlan(int kind, const ConvShape& s, Build build) {
  static std::mutex mutex;
  static std::map<std::tuple<int, decltype(s.Key())>, std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = plans[std::make_tuple(kind, s.Key())];
  if (!slot) slot = std::make_unique<Plan>(build());
  return *slot;
}

std::optional<dt> DnnlType(ffi::DataType type) {
  if (type == ffi::DataType::F32) return dt::f32;
  if (type == ffi::DataType::BF16) return dt::bf16;
  return std::nullopt;
}

// The call's shape, thread count and data types: ``src`` and ``dst`` (its activations'), ``operands``
// (the type of its activation operands, and of its weights unless it is a kernel gradient, whose
// weights are float32).
ConvShape CallShape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y, ffi::Span<const int64_t> w,
                    int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t threads,
                    dt src, dt dst, dt operands, bool kernel_grad) {
  ConvShape s{x[0], x[1], x[2], x[3], y[1], y[2], w[3], w[0], w[1], sh, sw, pt, pl, pb, pr, ThreadsFor(threads)};
  s.src = src;
  s.dst = dst;
  s.operands = operands;
  s.weights = kernel_grad ? dt::f32 : operands;
  return s;
}

// The types a call takes: activation operands ``a`` and ``b`` of one type, float32 or bfloat16;
// its result of that type or float32 (a kernel gradient's: float32); its weights operand of the
// operands' type. Else nullopt.
std::optional<dt> OperandType(ffi::DataType a, ffi::DataType b, ffi::DataType result, bool kernel_grad) {
  auto type = DnnlType(a);
  bool result_ok = result == ffi::DataType::F32 || (!kernel_grad && result == a);
  if (!type || b != a || !result_ok) return std::nullopt;
  return type;
}

ffi::Error TypeError() {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "oneDNN convolution: operands must be all float32 or all bfloat16, the result of "
                    "their type or float32 (a kernel gradient float32)");
}

// Memory a thread reuses from call to call (scratchpads, blocked weights), grown as needed,
// rather than allocated (and faulted in) on every call of every step.
enum Slot { kScratchpad, kReorderScratchpad, kBlockedWeights, kSlots };

memory ThreadMemory(Slot slot, const memory::desc& desc) {
  struct Buffer {
    void* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[kSlots];
  Buffer& buffer = buffers[slot];
  size_t bytes = std::max<size_t>(64, (desc.get_size() + 63) / 64 * 64);
  if (buffer.size < bytes) {
    std::free(buffer.data);
    buffer.data = std::aligned_alloc(64, bytes);
    buffer.size = buffer.data ? bytes : 0;
    if (!buffer.data) throw std::bad_alloc();
  }
  return memory(desc, Engine(), buffer.data);
}

// Runs the convolution with ``args`` (its activations) and the HWIO weights ``hwio``: read
// (weights_in) or written (the kernel gradient), through the plan's reorder when it has one.
void Run(const Plan& plan, std::unordered_map<int, memory> args, memory hwio, bool weights_in,
         int weights_arg) {
  thread_local dnnl::stream stream(Engine());
  args.insert({DNNL_ARG_SCRATCHPAD, ThreadMemory(kScratchpad, plan.scratchpad)});
  if (!plan.has_reorder) {
    args.insert({weights_arg, hwio});
    plan.conv.execute(stream, args);
  } else {
    memory blocked = ThreadMemory(kBlockedWeights, plan.weights);
    std::unordered_map<int, memory> reorder_args{
        {DNNL_ARG_FROM, weights_in ? hwio : blocked}, {DNNL_ARG_TO, weights_in ? blocked : hwio},
        {DNNL_ARG_SCRATCHPAD, ThreadMemory(kReorderScratchpad, plan.reorder_scratchpad)}};
    args.insert({weights_arg, blocked});
    if (weights_in) plan.reorder.execute(stream, reorder_args);
    plan.conv.execute(stream, args);
    if (!weights_in) plan.reorder.execute(stream, reorder_args);
  }
  stream.wait();
}

// A handler's body, its exceptions (oneDNN's, out of memory) returned to XLA as errors.
template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    return body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "oneDNN: out of memory for its scratch space");
  }
}

// How long RunPieces's calling thread spins for the pool's pieces before it sleeps.
constexpr std::chrono::microseconds kSpinBeforeSleeping{200};

// A busy-wait loop's pause (x86's PAUSE: spares the memory bus and the sibling hyperthread).
// std::this_thread::yield, a system call, gained about half as much (LeNet-5 1.046x at batch 32).
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Runs piece(0) .. piece(pieces - 1): the first here, the others offered to XLA's intra-op thread
// pool and taken back by this thread when no pool thread has started them by the time it is done
// with its own. A layer XLA runs alone then has the idle core work on it; one that XLA runs beside
// other work stays on this thread, with no more threads than cores (oneDNN on all cores beside
// XLA's work oversubscribed them: GoogLeNet 0.79-0.86x).
template <typename Piece>
void RunPieces(ffi::ThreadPool& pool, int64_t pieces, Piece piece) {
  struct State {
    std::unique_ptr<std::atomic<bool>[]> claimed;
    std::mutex mutex;
    std::condition_variable finished;
    std::atomic<int64_t> done{0};
    std::exception_ptr error;
    Piece* piece;
  };
  auto state = std::make_shared<State>();
  state->claimed.reset(new std::atomic<bool>[pieces]);
  for (int64_t i = 0; i < pieces; ++i) state->claimed[i] = false;
  state->piece = &piece;
  // A task that finds its piece taken returns at once: it may run after this call has returned, so
  // it touches nothing but the shared state until it has claimed its piece, which it can only do
  // while this call waits.
  for (int64_t i = 1; i < pieces; ++i) {
    pool.Schedule([state, i] {
      if (state->claimed[i].exchange(true)) return;
      std::exception_ptr error;
      try {
        (*state->piece)(i);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(state->mutex);
      if (error) state->error = error;
      ++state->done;
      state->finished.notify_all();
    });
  }
  int64_t taken_by_pool = 0;
  std::exception_ptr error;
  try {
    state->claimed[0] = true;
    piece(0);
  } catch (...) {
    error = std::current_exception();
  }
  for (int64_t i = 1; i < pieces; ++i) {
    if (state->claimed[i].exchange(true)) {
      ++taken_by_pool;
      continue;
    }
    try {
      if (!error) piece(i);
    } catch (...) {
      error = std::current_exception();
    }
  }
  // The pool's pieces are mostly under way by now: spin for them a while before sleeping, as a
  // sleeping thread wakes 10-20 us after the notification. LeNet-5 at batch 32 1.077x and 1.119x
  // (9 of 9 rounds each) with 200 us, 1.081x with 1,000, 1.082x with 50; at 128 1.045x and 1.065x,
  // 1.044x, 1.048x; GoogLeNet 0.99-1.01x.
  const auto spin_until = std::chrono::steady_clock::now() + kSpinBeforeSleeping;
  while (state->done.load(std::memory_order_acquire) != taken_by_pool && std::chrono::steady_clock::now() < spin_until)
    CpuRelax();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done == taken_by_pool; });
  if (!error) error = state->error;
  if (error) std::rethrow_exception(error);
}

// How many pieces a call of n images is split into: ``requested``, 0 for one a thread of XLA's pool.
int64_t PiecesFor(ffi::ThreadPool& pool, int64_t requested, int64_t n) {
  return std::max<int64_t>(1, std::min(requested == 0 ? pool.num_threads() : requested, n));
}

// The first image of piece i (of n images in ``pieces``; i == pieces: n). An even split, but for one
// image more in the calling thread's piece (0): a pool thread starts its piece a wake-up later
// (10-17 us measured), on a core whose caches lack the operands. LeNet-5 1.076x at batch 32 (11 of
// 11 rounds), 1.036x at 128 (7 of 9); two images more 1.038x / 1.021x; GoogLeNet 1.00x at both.
int64_t PieceStart(int64_t n, int64_t pieces, int64_t i) {
  if (i == 0) return 0;
  if (i == pieces) return n;
  int64_t lead = n / pieces + (n > pieces ? 1 : 0);
  return lead + (n - lead) * (i - 1) / (pieces - 1);
}

// body(piece's shape, its first image, its index) for each piece of the call's batch (RunPieces),
// each on the call's OpenMP thread count.
template <typename Body>
void ForEachPiece(ffi::ThreadPool& pool, const ConvShape& s, int64_t pieces, Body body) {
  RunPieces(pool, pieces, [&](int64_t i) {
    omp_set_num_threads(s.threads);
    int64_t first = PieceStart(s.n, pieces, i), last = PieceStart(s.n, pieces, i + 1);
    ConvShape piece = s;
    piece.n = last - first;
    body(piece, first, i);
  });
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t threads,
                       int64_t pieces) {
  auto operands = OperandType(x.element_type(), w.element_type(), y->element_type(), false);
  if (!operands) return TypeError();
  return Guarded([&] {
    ConvShape s = CallShape(x.dimensions(), y->dimensions(), w.dimensions(), sh, sw, pt, pl, pb, pr, threads,
                            *operands, *DnnlType(y->element_type()), *operands, false);
    ForEachPiece(pool, s, PiecesFor(pool, pieces, s.n), [&](const ConvShape& p, int64_t first, int64_t) {
      const Plan& plan = CachedPlan(0, p, [&] {
        auto pd = ForwardPd(p);
        return MakePlan(dnnl::convolution_forward(pd), pd, pd.weights_desc(), p, true);
      });
      Run(plan, {{DNNL_ARG_SRC, p.SrcAt(x.untyped_data(), first)}, {DNNL_ARG_DST, p.DstAt(y->untyped_data(), first)}},
          p.Hwio(w.untyped_data()), true, DNNL_ARG_WEIGHTS);
    });
    return ffi::Error::Success();
  });
}

ffi::Error InputGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                         int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t threads,
                         int64_t pieces) {
  auto operands = OperandType(g.element_type(), w.element_type(), dx->element_type(), false);
  if (!operands) return TypeError();
  return Guarded([&] {
    ConvShape s = CallShape(dx->dimensions(), g.dimensions(), w.dimensions(), sh, sw, pt, pl, pb, pr, threads,
                            *DnnlType(dx->element_type()), *operands, *operands, false);
    ForEachPiece(pool, s, PiecesFor(pool, pieces, s.n), [&](const ConvShape& p, int64_t first, int64_t) {
      const Plan& plan = CachedPlan(1, p, [&] {
        auto pd = BackwardPd<dnnl::convolution_backward_data>(p);
        return MakePlan(dnnl::convolution_backward_data(pd), pd, pd.weights_desc(), p, true);
      });
      Run(plan, {{DNNL_ARG_DIFF_DST, p.DstAt(g.untyped_data(), first)},
                 {DNNL_ARG_DIFF_SRC, p.SrcAt(dx->untyped_data(), first)}},
          p.Hwio(w.untyped_data()), true, DNNL_ARG_WEIGHTS);
    });
    return ffi::Error::Success();
  });
}

// The kernel gradient, float32 whatever the activations' type. Each piece's goes to a buffer of
// its own (the first to the result), summed after.
ffi::Error KernelGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dw,
                          int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t threads,
                          int64_t pieces) {
  auto operands = OperandType(x.element_type(), g.element_type(), dw->element_type(), true);
  if (!operands) return TypeError();
  return Guarded([&] {
    ConvShape s = CallShape(x.dimensions(), g.dimensions(), dw->dimensions(), sh, sw, pt, pl, pb, pr, threads,
                            *operands, *operands, *operands, true);
    const int64_t n_pieces = PiecesFor(pool, pieces, s.n);
    const size_t kernel_size = dw->element_count();
    std::vector<std::vector<float>> partial(n_pieces - 1, std::vector<float>(kernel_size));
    float* out = static_cast<float*>(dw->untyped_data());
    ForEachPiece(pool, s, n_pieces, [&](const ConvShape& p, int64_t first, int64_t i) {
      const Plan& plan = CachedPlan(2, p, [&] {
        auto pd = BackwardPd<dnnl::convolution_backward_weights>(p);
        return MakePlan(dnnl::convolution_backward_weights(pd), pd, pd.diff_weights_desc(), p, false);
      });
      Run(plan,
          {{DNNL_ARG_SRC, p.SrcAt(x.untyped_data(), first)}, {DNNL_ARG_DIFF_DST, p.DstAt(g.untyped_data(), first)}},
          p.Hwio(i == 0 ? out : partial[i - 1].data()), false, DNNL_ARG_DIFF_WEIGHTS);
    });
    for (const auto& part : partial)
      for (size_t j = 0; j < kernel_size; ++j) out[j] += part[j];
    return ffi::Error::Success();
  });
}

// XLA's intra-op thread pool, two operands, one result (float32 or bfloat16: OperandType), the
// geometry, the OpenMP thread count and the number of pieces.
#define CONV_BINDING                                                                    \
  ffi::Ffi::Bind()                                                                      \
      .Ctx<ffi::ThreadPool>()                                                           \
      .Arg<ffi::AnyBuffer>()                                                            \
      .Arg<ffi::AnyBuffer>()                                                            \
      .Ret<ffi::AnyBuffer>()                                                            \
      .Attr<int64_t>("stride_h")                                                        \
      .Attr<int64_t>("stride_w")                                                        \
      .Attr<int64_t>("pad_top")                                                         \
      .Attr<int64_t>("pad_left")                                                        \
      .Attr<int64_t>("pad_bottom")                                                      \
      .Attr<int64_t>("pad_right")                                                       \
      .Attr<int64_t>("threads")                                                         \
      .Attr<int64_t>("pieces")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, ForwardImpl, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvInputGrad, InputGradImpl, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvKernelGrad, KernelGradImpl, CONV_BINDING);
