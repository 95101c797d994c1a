"""Muon for a ViT's hidden matrices, AdamW for the rest, stepped as one optimiser.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"; `torch.optim.Muon`)
keeps momentum like SGD and replaces each 2-D update by the nearest semi-orthogonal matrix, found with a few
Newton-Schulz iterations: every direction of the update then moves the weights alike, where AdamW's updates
are dominated by a few. It is meant for the hidden layers' matrices only; the embeddings, the head, norms and
biases keep AdamW. With `adjust_lr_fn='match_rms_adamw'` (Moonshot's scaling) it takes AdamW's learning rate and
weight decay unchanged, so the same schedule drives both.
"""
import torch

if not hasattr(torch.optim, 'Muon'):  # an older torch installed before (a conda environment, `pip install --no-deps`)
    raise ImportError(f'vitdemo needs torch 2.9 or later (for torch.optim.Muon); this is torch {torch.__version__}. '
                      'Upgrade it: pip install -U -r requirements.txt')


def orthogonalise(update: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration (the nearest semi-orthogonal matrix, roughly),
    computed in `dtype`."""
    a, b, c = coefficients
    x = update.to(dtype)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` (its groups, checks, momentum buffers and state dict), orthogonalising in `ns_dtype`.
    torch's iterates in bfloat16, which suits a GPU or a CPU with bf16 arithmetic; a CPU without it emulates
    bfloat16 products, and there the optimiser would cost more than the model's own step: float32 then."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        # the rate for a matrix's shape, as torch's Muon scales it; private to torch, so imported here: a
        # release that moves it stops Muon's runs, not the app's start
        from torch.optim._muon import _adjust_lr
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            for p, grad, buffer in zip(params, grads, buffers):
                # torch's update, phase by phase: Nesterov momentum, orthogonalised, decoupled decay, scaled step
                buffer.lerp_(grad, 1 - group['momentum'])
                update = grad.lerp(buffer, group['momentum']) if group['nesterov'] else buffer
                update = orthogonalise(update, group['ns_coefficients'], group['ns_steps'], group['eps'],
                                       self.ns_dtype)
                p.mul_(1 - group['lr'] * group['weight_decay'])
                p.add_(update.to(p.dtype), alpha=-_adjust_lr(group['lr'], group['adjust_lr_fn'], p.shape))


class Optimizers:
    """Several optimisers as one: the loop sets each group's rate, the gradient scaler unscales and steps them,
    and the state file saves and loads them, as it would one optimiser (groups and parameters numbered on
    from one optimiser to the next, as torch numbers them within one)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        # each parameter's own moments (the optimisers' dicts themselves: what is changed in them stays); not a
        # ChainMap, whose lookups would add empty entries to an optimiser's defaultdict
        return {p: moments for o in self.optimizers for p, moments in o.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        merged, offset = {'state': {}, 'param_groups': []}, 0
        for o in self.optimizers:
            own = o.state_dict()
            merged['state'].update({offset + i: moments for i, moments in own['state'].items()})
            merged['param_groups'] += [{**g, 'params': [offset + i for i in g['params']]} for g in own['param_groups']]
            offset += sum(len(g['params']) for g in own['param_groups'])
        return merged

    def load_state_dict(self, state: dict) -> None:
        groups, offset = iter(state['param_groups']), 0
        for o in self.optimizers:
            mine = [next(groups) for _ in o.param_groups]
            numbers = [i for g in mine for i in g['params']]
            o.load_state_dict({'state': {i - offset: state['state'][i] for i in numbers if i in state['state']},
                               'param_groups': [{**g, 'params': [i - offset for i in g['params']]} for g in mine]})
            offset += len(numbers)


def make_optimizer(groups: list[dict], lr: float, ns_dtype: torch.dtype) -> torch.optim.Optimizer | Optimizers:
    """AdamW for the groups (see `vitdemo.train.param_groups`), and Muon for those marked `muon`."""
    # fused: one kernel per tensor instead of a dozen (on the CPU the default is a Python loop over tensors)
    adamw = torch.optim.AdamW([g for g in groups if not g.get('muon')], lr=lr, betas=(0.9, 0.999), fused=True)
    matrices = [g for g in groups if g.get('muon')]
    if not matrices:
        return adamw
    return Optimizers(adamw, Muon(matrices, lr=lr, adjust_lr_fn='match_rms_adamw', ns_dtype=ns_dtype))
