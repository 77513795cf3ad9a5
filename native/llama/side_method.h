// pyllm-kv side state, internal: what one method (DecoQuant, SQuat, ...) plugs
// into the mechanism of side_state.cpp. Not part of the ABI the patches see
// (that is pkv/llama_side_state.h).
//
// The mechanism owns, per model layer, a stack of method slots for K and one
// for V (which methods a cache type gets is the table in side_formats.cpp). A
// slot is one method's state for one layer's K (or V):
//   - a host copy of its matrices (for state save/restore and the fit), and
//   - the same matrices in the KV cache's own backend buffer (allocated with
//     the layer's K/V, so on the layer's device), which the graph reads.
// A slot is "fitted" once it learnt its matrices from the first ubatch that
// reached an empty cache. Graphs built before that contain the method's fit op
// (a CPU op) whose output is copied into the backend tensor inside the graph;
// graphs built after it read the backend tensor directly: no host round trip on
// the decode path.
#pragma once

#include "ggml.h"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace pkv {

// Settings read from the environment once per cache (PYLLM_KV_*).
struct side_settings {
    // DecoQuant
    int  deco_group    = 16;
    int  deco_variant  = 0;     // PKV_DECO_WHITEN / PKV_DECO_ROTATE
    bool deco_hadamard = false; // keep upstream's Hadamard rotation under the deco transform
    // SQuat
    int   squat_rank      = 20;
    float squat_lambda    = 100.0f;
    bool  squat_normalize = true;
    bool  squat_on_deco   = false; // squat* types get the deco transform instead of Hadamard
    // PYLLM_KV_SQUAT_REFIT: "first" fits U once, from the first ubatch; "ubatch"
    // refits it from every ubatch of at least PKV_SQUAT_REFIT_MIN_TOKENS tokens
    // (each prompt's keys encoded against its own queries; decode steps keep
    // the last U). Safe at any time: U only steers how new keys are encoded,
    // stored blocks are plain kv blocks that attention reads without it.
    bool  squat_refit_ubatch = false;
    // PYLLM_KV_FIT_TRACE=1: one stderr line per fitted head (layer, head, thread,
    // rows, milliseconds), to tell the fit's arithmetic from the rest of a fit
    // graph's cost (on a GPU: the copies and synchronisations around the CPU op).
    bool  squat_fit_trace = false;
    // Centering (PYLLM_KV_CENTER): subtract the prompt's center row from K
    // and/or V rows of our types before they are stored. "auto" (default): the
    // keys of squat* types (measured: docs/quality.md); "none", "k", "v", "kv":
    // as named, for every type of ours.
    bool center_auto = true;
    bool center_k = false;
    bool center_v = false;
    // PYLLM_KV_GPU_FIT: which fit ops a GPU backend may compute itself
    // (pkv/ggml_fit_op.h, native/cuda/pkv_fit.cu). "center" (default): the key
    // center (a median: ~55 us per Llama-8B layer on an H100, and no GPU<->CPU
    // round trip); "all": SQuat's U too (head size 64/128; its Jacobi solver
    // took 4.5 ms per layer, slower than the CPU fit it replaces, docs/speed.md);
    // "none": every fit a CPU op (the previous behaviour, for A/B).
    bool gpu_fit_center = true;
    bool gpu_fit_squat = false;
};

// Marks a fit op (a custom op) as computable by a GPU backend: writes
// pkv/ggml_fit_op.h's parameters into its op_params. The op's function must
// accept ith == PKV_FIT_ON_DEVICE (the backend computed it; nothing to copy).
void mark_device_fit(ggml_tensor * op, int kind, int rank = 0, float lambda = 0.0f, int normalize = 0,
                     int64_t fit_rows = 0);

// One layer's K (or V) as the cache allocates it.
struct layer_shape {
    int     il;
    bool    is_v;
    int64_t head_dim;
    int64_t n_head_kv;
    ggml_type type;   // the cache type of this side (K or V)
};

// Bounded reader over a state blob: every read is checked against its end.
struct blob_reader {
    const uint8_t * p, * end;
    bool get(void * dst, size_t n);
    const uint8_t * take(size_t n);
};

// Appends to a state blob.
struct blob_writer {
    uint8_t * p;
    void put(const void * src, size_t n);
    void zeros(size_t n);
};

size_t pad4(size_t n);

// Number of tensors one slot may add to the cache's ggml context (sizing).
constexpr int SLOT_MAX_TENSORS = 1;

class slot {
public:
    virtual ~slot() = default;

    // Create the slot's backend tensor(s) in the layer's K/V context (no data).
    virtual void add_tensors(ggml_context * ctx) = 0;

    // Learnt from a prompt (or restored) and usable as is by a graph.
    virtual bool fitted() const = 0;

    // Forget everything (empty cache): the next ubatch fits anew.
    virtual void reset() = 0;

    // Graph hooks of build_attn, in stack order for K (q and k in, both may be
    // replaced) and for V; attn_out runs in reverse stack order on the
    // attention output (V slots only). q, k, v are f32 once any slot ran.
    virtual void attn_in_k(ggml_context *, ggml_tensor ** /*q*/, ggml_tensor ** /*k*/) {}
    virtual void attn_in_v(ggml_context *, ggml_tensor ** /*v*/) {}
    virtual ggml_tensor * attn_out(ggml_context *, ggml_tensor * cur) { return cur; }

    // Keys' center row folded into the K store: where the storing slot's
    // encoder can subtract a center row itself (store_takes_key_center: the
    // CUDA SQuat encoder), the centering slot just before it runs
    // defer_key_center instead of attn_in_k (k made f32 contiguous, the fit
    // if due, and the row [head_dim, n_head_kv] returned, not subtracted),
    // and the store gets it by set_key_center: one graph op less per layer
    // and token, the same bytes.
    virtual ggml_tensor * defer_key_center(ggml_context *, ggml_tensor ** /*k*/) { return nullptr; }
    virtual bool store_takes_key_center() const { return false; }
    virtual void set_key_center(ggml_tensor * /*mu*/) {}

    // Store K rows into the cache instead of upstream's set_rows (nullptr: not
    // this slot's job). Only the last slot of a K stack may store.
    virtual ggml_tensor * store_k(ggml_context *, ggml_tensor * /*k_cache*/, ggml_tensor * /*k_cur*/,
                                  ggml_tensor * /*k_idxs*/) { return nullptr; }

    // K-shift: rows decoded to f32 -> undo (reverse stack order) -> RoPE -> redo.
    virtual ggml_tensor * kshift_undo(ggml_context *, ggml_tensor * x) { return x; }
    virtual ggml_tensor * kshift_redo(ggml_context *, ggml_tensor * x) { return x; }

    // Session state. state_read is called twice: first with commit = false (parse
    // and validate only; nothing may change), then, if every slot accepted, with
    // commit = true. replace: whole-context restore; otherwise one sequence's
    // state, which may only adopt into an unfitted slot or match a fitted one.
    // Returns nullptr on success, else a message naming the problem.
    virtual size_t state_size() const = 0;
    virtual void state_write(blob_writer & w) const = 0;
    virtual const char * state_read(blob_reader & r, bool replace, bool commit) = 0;
};

// Copy host bytes into a backend tensor, if it has real memory (a cache made
// only to measure sizes has a dummy buffer).
void upload(ggml_tensor * t, const void * data, size_t n);

// The reverse: a backend tensor's bytes into host memory (a slot's host copy
// after a fit on a GPU), if it has real memory.
void download(const ggml_tensor * t, void * data, size_t n);

// The methods (one file each); they throw std::runtime_error naming the
// problem for a layer they cannot serve (head size, ...).
std::unique_ptr<slot> make_deco_slot(const side_settings & st, const layer_shape & sh);
std::unique_ptr<slot> make_squat_slot(const side_settings & st, const layer_shape & sh);
std::unique_ptr<slot> make_center_slot(const side_settings & st, const layer_shape & sh);

// Every fit, reset and restore moves this process-wide counter: llama.cpp may
// reuse a graph only if it did not move since the graph was built (a graph
// holds either a fit op or the fitted tensors, see pkv_side_epoch()).
void bump_epoch();

// x viewed as groups of g values (g = R's size), each multiplied by the g x g
// matrix R (ggml's mul_mat orientation: y = R x per group); same shape as x.
ggml_tensor * apply_group_matrix(ggml_context * ctx, ggml_tensor * x, ggml_tensor * R);

// x as contiguous f32 (the side-state ops read plain float rows).
ggml_tensor * as_f32_contiguous(ggml_context * ctx, ggml_tensor * x);

} // namespace pkv
