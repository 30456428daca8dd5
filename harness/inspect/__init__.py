"""Look inside a model: the pictures people know from FlashTorch, keras-vis and the CNN-visualisation
tutorials, for any model the harness loads, batched and on its device.

    python -m harness.inspect [model=...] [data=...] [device=...] [actmax.layer=...] [out=...]

writes into `out` one PNG per figure with its arrays (`.npz`) and settings (`.json`): the saliency
figure per image (plain and guided), the filter grid of a convolution, feature maps, activation
maximisation of channels or classes (`actmax`), the occlusion heatmap, per-layer weight histograms
and the top-k predictions. `pictures` computes the arrays, `figures` draws them, `actmax` runs the
ascent, `layers` checks the names given, `app` is the command.
"""
