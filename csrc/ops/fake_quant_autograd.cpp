// Eager training entry points of the fake-quant family with their autograd in C++.
//
// FakeQuant's eager forward is called once per quantizer per step (about 65 times in a
// ResNet-20 QAT step). Through the Python custom op and a torch.autograd.Function each call
// costs ~150 us of Python and dispatcher work forward + backward, more than the kernels on
// most activations. These ops record a C++ autograd node instead: the backward never enters
// Python. They redispatch below autograd to the backend kernels (fq_observe_forward,
// fq_forward, fq_mask_backward), so every device with those kernels has them; torch.compile
// and export keep using the torch.library ops in acq_kernels/fake_quant/ops.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The packed mask numbers elements in the forward output's memory order: lay the gradient
// out the same way (a no-op for the usual same-layout gradient).
Tensor restrided(const Tensor& grad, at::IntArrayRef sizes, at::IntArrayRef strides) {
  if (grad.numel() <= 1 || grad.strides() == strides) return grad;
  Tensor g = at::empty_strided(sizes, strides, grad.options());
  g.copy_(grad);
  return g;
}

Tensor mask_backward(const Tensor& grad, const Tensor& mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("acq_kernels_C::fq_mask_backward", "")
                       .typed<Tensor(const Tensor&, const Tensor&)>();
  return op.call(grad, mask);
}

// Saves what the clipped STE's backward needs: the packed mask and the output's geometry.
void save_mask(AutogradContext* ctx, const Tensor& out, const Tensor& mask, bool saved) {
  if (ctx == nullptr) return;  // called below autograd
  ctx->saved_data["saved"] = saved;
  if (!saved) return;
  ctx->saved_data["sizes"] = out.sizes().vec();
  ctx->saved_data["strides"] = out.strides().vec();
  ctx->save_for_backward({mask});
}

Tensor masked_grad(AutogradContext* ctx, const Tensor& grad) {
  if (!grad.defined() || !ctx->saved_data["saved"].toBool()) return grad;  // pure STE
  const Tensor mask = ctx->get_saved_variables()[0];
  const auto sizes = ctx->saved_data["sizes"].toIntVector();
  const auto strides = ctx->saved_data["strides"].toIntVector();
  return mask_backward(restrided(grad, sizes, strides), mask);
}

// Observer step + qparams + fake quant (fq_observe_forward with quantize=true); the state
// buffers are updated in place and are not differentiated.
struct ObserveFakeQuant : public torch::autograd::Function<ObserveFakeQuant> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, Tensor min_val, Tensor max_val,
                        Tensor scale, Tensor zero_point, int64_t axis, double averaging_constant,
                        bool moving_average, int64_t quant_min, int64_t quant_max, bool symmetric,
                        int64_t symmetric_zero_point, double eps, bool clipped) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("acq_kernels_C::fq_observe_forward", "")
            .typed<std::tuple<Tensor, Tensor>(const Tensor&, Tensor&, Tensor&, Tensor&, Tensor&,
                                              int64_t, double, bool, int64_t, int64_t, bool,
                                              int64_t, double, bool, bool)>();
    const bool saved = clipped && x.requires_grad();  // clipped: grad mode is on (see below)
    Tensor out, mask;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, mask) = op.call(x, min_val, max_val, scale, zero_point, axis,
                                    averaging_constant, moving_average, quant_min, quant_max,
                                    symmetric, symmetric_zero_point, eps, true, saved);
    }
    for (const Tensor* t : {&min_val, &max_val, &scale, &zero_point}) {
      // written in place, as the schema says (inference tensors keep no version)
      if (!t->is_inference()) torch::autograd::impl::bump_version(*t);
    }
    save_mask(ctx, out, mask, saved);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(14);
    out[0] = masked_grad(ctx, grads[0]);
    return out;
  }
};

// Fake quant with fixed qparams (observer disabled).
struct FakeQuantFixed : public torch::autograd::Function<FakeQuantFixed> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale,
                        const Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                        int64_t axis, bool clipped) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("acq_kernels_C::fq_forward", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                           const Tensor&, int64_t, int64_t,
                                                           int64_t, bool)>();
    const bool saved = clipped && x.requires_grad();
    Tensor out, mask;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, mask) = op.call(x, scale, zero_point, quant_min, quant_max, axis, saved);
    }
    save_mask(ctx, out, mask, saved);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);
    out[0] = masked_grad(ctx, grads[0]);
    return out;
  }
};

Tensor fq_observe_train(const Tensor& x, Tensor& min_val, Tensor& max_val, Tensor& scale,
                        Tensor& zero_point, int64_t axis, double averaging_constant,
                        bool moving_average, int64_t quant_min, int64_t quant_max,
                        bool symmetric, int64_t symmetric_zero_point, double eps, bool clipped) {
  // No mask is kept when no graph is recorded (no_grad, or x needs no gradient).
  return ObserveFakeQuant::apply(x, min_val, max_val, scale, zero_point, axis,
                                 averaging_constant, moving_average, quant_min, quant_max,
                                 symmetric, symmetric_zero_point, eps,
                                 clipped && at::GradMode::is_enabled());
}

Tensor fq_forward_train(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                        int64_t quant_min, int64_t quant_max, int64_t axis, bool clipped) {
  return FakeQuantFixed::apply(x, scale, zero_point, quant_min, quant_max, axis,
                               clipped && at::GradMode::is_enabled());
}

// Below autograd (inference mode): the forward alone, no mask.
Tensor fq_observe_train_plain(const Tensor& x, Tensor& min_val, Tensor& max_val, Tensor& scale,
                              Tensor& zero_point, int64_t axis, double averaging_constant,
                              bool moving_average, int64_t quant_min, int64_t quant_max,
                              bool symmetric, int64_t symmetric_zero_point, double eps, bool) {
  return ObserveFakeQuant::forward(nullptr, x, min_val, max_val, scale, zero_point, axis,
                                   averaging_constant, moving_average, quant_min, quant_max,
                                   symmetric, symmetric_zero_point, eps, false);
}

Tensor fq_forward_train_plain(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                              int64_t quant_min, int64_t quant_max, int64_t axis, bool) {
  return FakeQuantFixed::forward(nullptr, x, scale, zero_point, quant_min, quant_max, axis,
                                 false);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(acq_kernels_C, m) {
  // clipped: PyTorch's STE (the gradient is masked outside the range), else the identity.
  m.def("fq_observe_train(Tensor x, Tensor(a!) min_val, Tensor(b!) max_val, Tensor(c!) scale, "
        "Tensor(d!) zero_point, int axis, float averaging_constant, bool moving_average, "
        "int quant_min, int quant_max, bool symmetric, int symmetric_zero_point, float eps, "
        "bool clipped) -> Tensor");
  m.def("fq_forward_train(Tensor x, Tensor scale, Tensor zero_point, int quant_min, "
        "int quant_max, int axis, bool clipped) -> Tensor");
}

// The Autograd key covers every device; below it the backend kernels are dispatched by device.
TORCH_LIBRARY_IMPL(acq_kernels_C, Autograd, m) {
  m.impl("fq_observe_train", &fq_observe_train);
  m.impl("fq_forward_train", &fq_forward_train);
}

TORCH_LIBRARY_IMPL(acq_kernels_C, CompositeExplicitAutograd, m) {
  m.impl("fq_observe_train", &fq_observe_train_plain);
  m.impl("fq_forward_train", &fq_forward_train_plain);
}
