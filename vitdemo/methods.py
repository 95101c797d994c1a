"""The explanation methods as the page lists them: their names and labels, which models offer which, and
what the slow ones are told as they go. No torch: `vitdemo.explain` runs them, one function each (a new
method is one line here, its function there, and its test)."""
from dataclasses import dataclass
from typing import Callable

Progress = Callable[[float], None]  # told the share done, from 0 to 1; raises Stopped to stop the work


class Stopped(RuntimeError):
    """An explanation stopped before it was done: by the person who asked, or by the server's time limit."""


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # what the method list shows
    short: str  # in the faithfulness chart's legend
    description: str
    per_class: bool
    slow: bool  # many forward passes: shows progress, can be stopped
    offered_to: frozenset  # 'vit', 'cnn', 'distilled' (two prefix tokens)
    ranked: bool = True  # its overall map ranks patches in the faithfulness test
    paired: bool = False  # its maps come in pairs, to be seen side by side
    # the page's settings its maps depend on, beyond the image, the model and the class: moving any other
    # setting redraws a remembered explanation, never computes it again
    reads: tuple[str, ...] = ()


_VIT, _CNN, _ALL = frozenset({'vit'}), frozenset({'cnn'}), frozenset({'vit', 'cnn'})
METHODS = {m.name: m for m in [
    Method('attention', 'attention (the same for every class)', 'attention',
           'where the CLS token looks, layer by layer, and the rollout; the same for every class', False, False, _VIT,
           reads=('fusion', 'discard_ratio')),
    Method('tokens', "DeiT's two tokens: CLS and distillation", 'tokens',
           'where the CLS token (left) and the distillation token (right) look, layer by layer and rolled out; '
           'the same for every class', False, False, frozenset({'distilled'}), ranked=False, paired=True,
           reads=('fusion', 'discard_ratio')),
    Method('heads', 'every head of one layer', 'heads',
           'every head of the chosen layer on its own: heads specialise; the same for every class',
           False, False, _VIT, ranked=False, reads=('layer', 'keep')),
    Method('relevance', 'relevance for a class (Chefer et al. 2021)', 'relevance',
           'what speaks for the chosen class: gradient-weighted attention relevance (Chefer et al. 2021)',
           True, False, _VIT),
    Method('gradcam', 'Grad-CAM for a class', 'Grad-CAM',
           'where the evidence for the chosen class lies (Grad-CAM, Selvaraju et al. 2017)', True, False, _ALL),
    Method('gradcam++', 'Grad-CAM++ for a class', 'Grad-CAM++',
           'Grad-CAM++ (Chattopadhay et al. 2018, pytorch-grad-cam): Grad-CAM weighting each position\'s '
           'positive gradients', True, False, _ALL),
    Method('scorecam', 'Score-CAM for a class (slow)', 'Score-CAM',
           'Score-CAM (Wang et al. 2020, pytorch-grad-cam): each channel weighted by the class score of the '
           'image masked by that channel; one pass per channel', True, True, _ALL),
    Method('eigencam', 'EigenCAM (the same for every class)', 'EigenCAM',
           'EigenCAM (Muhammad & Yeasin 2020, pytorch-grad-cam): the first principal component of the last '
           'features; the same for every class', False, False, _ALL),
    Method('ig', 'Integrated Gradients for a class (slow)', 'Integrated Gradients',
           'Integrated Gradients (Sundararajan et al. 2017, Captum): each pixel\'s share of the class\'s '
           'probability, from a blank image to yours, summed per patch', True, True, _ALL),
    Method('shapley', 'Shapley values of patches for a class (slow)', 'Shapley values',
           'Shapley values of the patches (Captum\'s Shapley Value Sampling, Castro et al. 2009): each patch\'s '
           'average share of the class\'s probability over random orders of revealing the patches', True, True, _ALL),
    Method('occlusion', 'occlusion for a class (slow)', 'occlusion',
           'occlusion (Zeiler & Fergus 2014, Captum): how much the class\'s probability drops when each patch '
           'alone is blanked', True, True, _ALL),
]}


def kinds(cnn: bool, prefix_tokens: int) -> frozenset:
    """Which methods' kinds a model is, from what it is alone: a CNN, or a ViT (with DeiT's two tokens)."""
    if cnn:
        return _CNN
    return _VIT | ({'distilled'} if prefix_tokens == 2 else set())


def offered(model_kinds: frozenset) -> list[str]:
    return [name for name, m in METHODS.items() if m.offered_to & model_kinds]


# the methods' libraries (pytorch-grad-cam with OpenCV, Captum: ~3 s on two cores), imported by `vitdemo.explain` when
# first used, and by the server ahead of the first request
LIBRARIES = ('pytorch_grad_cam', 'pytorch_grad_cam.utils.model_targets', 'captum.attr')
