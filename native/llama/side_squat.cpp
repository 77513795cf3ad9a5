// SQuat side state (squat4/squat3/squat2 keys; docs/squat.md): per layer and
// KV head, the upper Cholesky factor U of A^-1, A = I + lambda Q^T Q, where Q
// spans the subspace of the first ubatch's queries of that head's GQA group
// (their Gram matrix is a matmul in the graph, the eigen-fit a CPU op).
// Keys are stored by the SQuat encoder (error pushed out of that subspace) as
// plain kv blocks, so attention reads them like kv*: nothing to undo at read
// time. The numerics are pkv_squat_prepare / pkv_squat_quantize_row
// (native/src/squat.c); the CUDA encoder is native/cuda/pkv_codec.cu.

#include "side_method.h"

#include "ggml-backend.h"
#include "pkv/codec.h"
#include "pkv/ggml_fit_op.h"
#include "pkv/ggml_hooks.h"
#include "pkv/sidestate.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

namespace pkv {
namespace {

// Smallest ubatch the "ubatch" refit policy fits from: fewer query rows than
// this give a poor subspace (a decode step has one), so those keep the last U.
constexpr int64_t PKV_SQUAT_REFIT_MIN_TOKENS = 32;

class squat_slot final : public slot {
public:
    squat_slot(const side_settings & st, const layer_shape & sh)
        : st(st), sh(sh), bits(PKV_GGML_BITS(sh.type)), n_head((int) sh.n_head_kv), d((int) sh.head_dim) {
        set_identity();
    }

    void add_tensors(ggml_context * ctx) override {
        dev = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, (int64_t) packed(), n_head);
        ggml_format_name(dev, "pkv_squat_u_l%d", sh.il);
    }

    bool fitted() const override {
        for (uint8_t f : head_fitted) {
            if (!f) {
                return false;
            }
        }
        return true;
    }

    void reset() override {
        set_identity();
        host_stale = false;
    }

    // The queries as attention will see them (after Hadamard or the deco
    // transform): fit U from them once; every graph hands U to store_k.
    void attn_in_k(ggml_context * ctx, ggml_tensor ** q, ggml_tensor ** k) override {
        ggml_tensor * qc = as_f32_contiguous(ctx, *q);
        if (qc->ne[0] != d || (*k)->ne[0] != d || (*k)->ne[1] != n_head || qc->ne[1] % n_head != 0) {
            throw std::runtime_error("pyllm-kv: SQuat side state of layer " + std::to_string(sh.il) +
                                     " does not match the layer's queries/keys (head size or KV heads)");
        }
        // a prompt-sized ubatch under the "ubatch" policy refits (docs/squat.md)
        const bool refit = st.squat_refit_ubatch && qc->ne[2] * qc->ne[3] >= PKV_SQUAT_REFIT_MIN_TOKENS;
        if (fitted() && !refit) {
            graph_U = dev;
        } else {
            // The Gram matrix of each KV head's GQA group of queries, on the
            // backend that holds them (a matmul: on a GPU it costs nothing
            // next to the prompt); only d x d per head crosses to the CPU fit.
            // Fewer query rows than d (a short prompt, a decode step) cross as
            // the rows themselves: smaller than d x d, and the fit then solves
            // the n_rows x n_rows problem (pkv_squat_prepare).
            const int64_t n_gqa = qc->ne[1] / n_head;
            const int64_t n_tok = qc->ne[2] * qc->ne[3];
            ggml_tensor * x = ggml_reshape_4d(ctx, qc, d, n_gqa, n_head, n_tok);
            ggml_tensor * fit_in = nullptr;
            if (n_gqa * n_tok < d) {
                x = ggml_cont(ctx, ggml_permute(ctx, x, 0, 1, 3, 2));   // [d, n_gqa, n_tok, n_head]
                fit_in = ggml_reshape_3d(ctx, x, d, n_gqa * n_tok, n_head);
            } else {
                x = ggml_cont(ctx, ggml_permute(ctx, x, 2, 0, 3, 1));   // [n_gqa, n_tok, d, n_head]
                x = ggml_reshape_3d(ctx, x, n_gqa * n_tok, d, n_head);
                fit_in = ggml_mul_mat(ctx, x, x);                       // [d, d, n_head]
                ggml_mul_mat_set_prec(fit_in, GGML_PREC_F32);
            }
            fit_rows = n_gqa * n_tok;
            // A key center fitted in this graph too (handed over by set_key_center,
            // folded into the store): its CPU fit op becomes an extra source of
            // this one (read by neither), so the graph orders both CPU fits next
            // to each other and the scheduler runs them in one CPU split per layer
            // (64 fewer GPU<->CPU round trips on the Llama-8B shape's first ubatch).
            ggml_tensor * args[2] = { fit_in, nullptr };
            int n_args = 1;
            if (graph_mu && graph_mu->op == GGML_OP_CPY && graph_mu->src[0] && graph_mu->src[0]->op == GGML_OP_CUSTOM) {
                args[n_args++] = graph_mu->src[0];
            }
            ggml_tensor * fit = ggml_custom_4d(ctx, GGML_TYPE_F16, (int64_t) packed(), n_head, 1, 1, args, n_args,
                                               refit ? refit_op : fit_op, GGML_N_TASKS_MAX, this);
            // A GPU backend may compute it (native/cuda/pkv_fit.cu) when it fits every head (the
            // first fit, or a refit); heads fitted apart (one sequence's restored state) keep the CPU op.
            if (st.gpu_fit_squat && (refit || none_fitted())) {
                mark_device_fit(fit, PKV_FIT_SQUAT, st.squat_rank, st.squat_lambda, st.squat_normalize ? 1 : 0,
                                fit_rows);
            }
            graph_U = ggml_cpy(ctx, fit, dev); // into the cache's tensor; the store reads the copy
        }
    }

    // The CUDA encoder subtracts the keys' center row itself (set_rows src[4]);
    // a K cache elsewhere (host memory, an rpc-server) gets the graph's ggml_sub.
    bool store_takes_key_center() const override {
        if (!dev || !dev->buffer || ggml_backend_buffer_is_host(dev->buffer) || !PKV_SQUAT_GPU_HEAD_DIM_OK(d)) {
            return false;
        }
        const char * name = ggml_backend_buft_name(ggml_backend_buffer_get_type(dev->buffer));
        return name && std::strncmp(name, "CUDA", 4) == 0;
    }

    void set_key_center(ggml_tensor * mu) override { graph_mu = mu; }

    ggml_tensor * store_k(ggml_context * ctx, ggml_tensor * k_cache, ggml_tensor * k_cur,
                          ggml_tensor * k_idxs) override {
        ggml_tensor * U = graph_U;
        graph_U = nullptr;
        ggml_tensor * mu = graph_mu;
        graph_mu = nullptr;
        if (!U) {
            throw std::runtime_error("pyllm-kv: SQuat key store without its fit hook (layer " +
                                     std::to_string(sh.il) + ")");
        }
        if (!PKV_GGML_IS_SQUAT(k_cache->type) || k_cache->ne[0] != (int64_t) n_head * d) {
            throw std::runtime_error("pyllm-kv: SQuat K cache does not match its side state");
        }
        if (k_cur->type != GGML_TYPE_F32) {
            k_cur = ggml_cast(ctx, k_cur, GGML_TYPE_F32);
        }
        const ggml_tensor * base = k_cache;
        while (base->view_src) {
            base = base->view_src;
        }
        if (!base->buffer || ggml_backend_buffer_is_host(base->buffer)) {
            // a key center comes only where store_takes_key_center said yes (a CUDA cache)
            GGML_ASSERT(mu == nullptr);
            ggml_tensor * args[4] = { k_cur, k_idxs, k_cache, U };
            return ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, args, 4, store_op, GGML_N_TASKS_MAX, this);
        }
        // Cache in device memory: set_rows with U as an extra source, which the
        // CUDA backend encodes with the SQuat encoder (patches/0009, native/cuda);
        // a backend without it refuses the op (supports_op) instead of storing plain.
        if (!PKV_SQUAT_GPU_HEAD_DIM_OK(d)) {
            throw std::runtime_error("pyllm-kv: SQuat keys in GPU memory need head size 64, 128 or 256 (this model: " +
                                     std::to_string(d) + "); keep the KV cache on the CPU (offload_kqv=False, "
                                     "llama.cpp -nkvo)");
        }
        ggml_tensor * t = ggml_set_rows(ctx, k_cache, k_cur, k_idxs);
        t->src[3] = U;
        t->src[4] = mu;   // the keys' center row, or none (patches/0009 checks its shape)
        return t;
    }

    // state: u32 n_head, u32 d, u8 head_fitted[n_head] (padded to 4),
    //        u16 U[n_head * d(d+1)/2] (packed fp16, pkv_squat_pack; padded to 4)
    size_t state_size() const override {
        return 2 * sizeof(uint32_t) + pad4(head_fitted.size()) + pad4(U.size() * sizeof(uint16_t));
    }

    void state_write(blob_writer & w) const override {
        sync_host();
        const uint32_t dims[2] = { (uint32_t) n_head, (uint32_t) d };
        w.put(dims, sizeof(dims));
        w.put(head_fitted.data(), head_fitted.size());
        w.zeros(pad4(head_fitted.size()) - head_fitted.size());
        w.put(U.data(), U.size() * sizeof(uint16_t));
        w.zeros(pad4(U.size() * sizeof(uint16_t)) - U.size() * sizeof(uint16_t));
    }

    const char * state_read(blob_reader & r, bool replace, bool commit) override {
        sync_host();
        uint32_t dims[2];
        if (!r.get(dims, sizeof(dims))) {
            return "pyllm-kv: side state in the state is truncated";
        }
        if (dims[0] != (uint32_t) n_head || dims[1] != (uint32_t) d) {
            return "pyllm-kv: SQuat side state in the state is for another head layout (different model?)";
        }
        const uint8_t * hf = r.take(pad4(head_fitted.size()));
        const uint8_t * u  = r.take(pad4(U.size() * sizeof(uint16_t)));
        if (!hf || !u) {
            return "pyllm-kv: side state in the state is truncated";
        }
        for (int h = 0; h < n_head; ++h) {
            if (hf[h] > 1) {
                return "pyllm-kv: SQuat side state in the state is corrupt (bad head flag)";
            }
        }
        for (size_t j = 0; j < U.size(); ++j) {
            uint16_t x;
            memcpy(&x, u + j * sizeof(x), sizeof(x));
            if ((x & 0x7c00) == 0x7c00) { // Inf or NaN
                return "pyllm-kv: SQuat side state in the state is corrupt (non-finite matrix)";
            }
        }
        const size_t pl = packed();
        if (!replace) {
            for (int h = 0; h < n_head; ++h) {
                if (hf[h] && head_fitted[h] &&
                    memcmp(U.data() + h * pl, u + h * pl * sizeof(uint16_t), pl * sizeof(uint16_t)) != 0) {
                    return "pyllm-kv: this sequence's saved SQuat side state differs from the one the context "
                           "already uses; restore it into a context without other sequences";
                }
            }
        }
        if (commit) {
            for (int h = 0; h < n_head; ++h) {
                if (replace || (hf[h] && !head_fitted[h])) {
                    memcpy(U.data() + h * pl, u + h * pl * sizeof(uint16_t), pl * sizeof(uint16_t));
                    head_fitted[h] = hf[h];
                }
            }
            upload(dev, U.data(), U.size() * sizeof(uint16_t));
        }
        return nullptr;
    }

private:
    const side_settings & st;
    const layer_shape sh;
    const int bits, n_head, d;
    mutable std::vector<uint16_t> U;  // host copy: n_head * packed(), identity until fitted
    mutable bool host_stale = false;  // fitted on a GPU (PKV_FIT_ON_DEVICE): U is in dev only
    std::vector<uint8_t> head_fitted; // per head: the fit op runs its heads on several threads
    ggml_tensor * dev = nullptr;      // U in the cache's buffer [packed, n_head] f16
    ggml_tensor * graph_U = nullptr;  // this graph's U, attn_in_k -> store_k
    ggml_tensor * graph_mu = nullptr; // this graph's key center row, set_key_center -> store_k
    int64_t fit_rows = 0;             // query rows behind the unfitted graph's Gram matrices

    size_t packed() const { return pkv_squat_packed_len(d); }

    bool none_fitted() const {
        for (uint8_t f : head_fitted) {
            if (f) {
                return false;
            }
        }
        return true;
    }

    // the host copy from the cache's tensor, after a fit on a GPU
    void sync_host() const {
        if (host_stale) {
            download(dev, U.data(), U.size() * sizeof(uint16_t));
        }
        host_stale = false;
    }

    // Every head back to U = I (plain encoding) and unfitted. Packed row j
    // starts with its diagonal entry (pkv_squat_pack's layout).
    void set_identity() {
        const uint16_t one = pkv_fp32_to_fp16(1.0f);
        U.assign((size_t) n_head * packed(), 0);
        for (int h = 0; h < n_head; ++h) {
            uint16_t * u = U.data() + (size_t) h * packed();
            size_t row = 0;
            for (int j = 0; j < d; ++j) {
                u[row] = one;
                row += (size_t) (d - j);
            }
        }
        head_fitted.assign((size_t) n_head, 0);
    }

    // CPU, threads split the heads: fit each unfitted head from src[0], f32,
    // either the Gram matrix of its GQA group's queries ([d, d, n_head],
    // fit_rows query rows each) or, when there are fewer rows than d, the rows
    // themselves ([d, rows, n_head]); output U of every head (packed fp16,
    // [packed, n_head]).
    static void fit_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
        fit_heads(dst, ith, nth, static_cast<squat_slot *>(userdata), false);
    }

    // The same, refitting fitted heads too (the "ubatch" refit policy).
    static void refit_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
        fit_heads(dst, ith, nth, static_cast<squat_slot *>(userdata), true);
    }

    static void fit_heads(ggml_tensor * dst, int ith, int nth, squat_slot * self, bool refit) {
        if (ith == PKV_FIT_ON_DEVICE) {   // a GPU backend fitted every head into dst (mark_device_fit's condition)
            std::fill(self->head_fitted.begin(), self->head_fitted.end(), (uint8_t) 1);
            self->host_stale = true;
            bump_epoch();
            return;
        }
        const ggml_tensor * gram = dst->src[0];
        const int d = self->d;
        for (int h = ith; h < self->n_head; h += nth) {
            uint16_t * Uh = self->U.data() + (size_t) h * self->packed();
            if (refit || !self->head_fitted[h]) {
                const auto t0 = std::chrono::steady_clock::now();
                const int64_t rows = gram->ne[1];   // d: a Gram matrix; fewer: the query rows
                std::vector<float> C((size_t) d * rows);
                for (int64_t i = 0; i < rows; ++i) {
                    memcpy(C.data() + (size_t) i * d, (const char *) gram->data + h * gram->nb[2] + i * gram->nb[1],
                           (size_t) d * sizeof(float));
                }
                // on failure pkv_squat_prepare(_gram) leaves U = I: this head is then plain kv
                std::vector<float> Ud((size_t) d * d);
                const int norm = self->st.squat_normalize ? 1 : 0;
                if (rows < d) {
                    pkv_squat_prepare(C.data(), rows, d, self->st.squat_rank, self->st.squat_lambda, norm, Ud.data());
                } else {
                    pkv_squat_prepare_gram(C.data(), self->fit_rows, d, self->st.squat_rank, self->st.squat_lambda,
                                           norm, Ud.data());
                }
                pkv_squat_pack(Ud.data(), d, Uh);
                self->head_fitted[h] = 1;
                bump_epoch();
                if (self->st.squat_fit_trace) {   // PYLLM_KV_FIT_TRACE (side_method.h)
                    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
                    std::fprintf(stderr, "pyllm-kv fit: SQuat layer %d head %d (thread %d of %d, %lld rows): %.3f ms\n",
                                 self->sh.il, h, ith, nth, (long long) self->fit_rows, ms);
                }
            }
            memcpy((char *) dst->data + (size_t) h * dst->nb[1], Uh, self->packed() * sizeof(uint16_t));
        }
    }

    // CPU encoder writing K rows straight into a host cache: src[0] K rows (f32,
    // n_embd_gqa x n_tokens), src[1] the cache row of each token (I32/I64),
    // src[2] the cache (n_embd_gqa x cells), src[3] U of every head. Threads
    // split the tokens.
    static void store_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
        const auto * self = static_cast<const squat_slot *>(userdata);
        const ggml_tensor * k     = dst->src[0];
        const ggml_tensor * idx   = dst->src[1];
        const ggml_tensor * cache = dst->src[2];
        const ggml_tensor * Ut    = dst->src[3];
        const int     d      = self->d;
        const int64_t n_tok  = k->ne[1];
        const size_t  head_b = (size_t) (d / PKV_BLOCK) * pkv_block_bytes(self->bits);
        if (ith >= n_tok) {
            return;
        }
        // this thread's dense copy of every head's U (the encoder reads rows of it);
        // thread_local so that decode does not allocate per layer and token
        thread_local std::vector<float> U;
        U.resize((size_t) self->n_head * d * d);
        for (int h = 0; h < self->n_head; ++h) {
            pkv_squat_unpack((const uint16_t *) ((const char *) Ut->data + (size_t) h * Ut->nb[1]), d,
                             U.data() + (size_t) h * d * d);
        }
        for (int64_t t = ith; t < n_tok; t += nth) {
            const int64_t row = idx->type == GGML_TYPE_I64 ? ((const int64_t *) idx->data)[t]
                                                           : (int64_t) ((const int32_t *) idx->data)[t];
            GGML_ASSERT(row >= 0 && row < cache->ne[1]);
            const float * src = (const float *) ((const char *) k->data + t * k->nb[1]);
            char * out = (char *) cache->data + row * cache->nb[1];
            for (int h = 0; h < self->n_head; ++h) {
                pkv_squat_quantize_row(self->bits, src + (size_t) h * d, U.data() + (size_t) h * d * d,
                                       d, out + h * head_b);
            }
        }
    }
};

} // namespace

std::unique_ptr<slot> make_squat_slot(const side_settings & st, const layer_shape & sh) {
    if (sh.is_v) {
        throw std::runtime_error("pyllm-kv: the SQuat encoder is for keys only");
    }
    if (sh.head_dim <= 0 || sh.head_dim % PKV_BLOCK != 0 || sh.head_dim > PKV_LINALG_MAX_N) {
        throw std::runtime_error(std::string("pyllm-kv: cache type ") + ggml_type_name(sh.type) +
                                 " needs a K head size that is a multiple of " + std::to_string(PKV_BLOCK) +
                                 " and at most " + std::to_string(PKV_LINALG_MAX_N) + " (this model: " +
                                 std::to_string(sh.head_dim) + ")");
    }
    return std::unique_ptr<slot>(new squat_slot(st, sh));
}

} // namespace pkv
