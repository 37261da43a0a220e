"""Evaluation components: the pieces the evaluation binary puts together.

frechet        Fréchet distance between Gaussians fitted to features; streaming statistics.
inception      the FID variant of InceptionV3 in Flax, weights from a local file only.
features       a small Fashion-MNIST classifier whose penultimate layer gives FID_FMNIST.
reference      reference statistics of a dataset split, cached by feature-network hash.
masks          inpainting mask families (Extrema, Square, Thin, Wide, Half, Perlin; for
               apd.sample also Top and Patches).
image_metrics  PSNR and SSIM.
lpips          LPIPS (AlexNet variant), weights from a local file only.
adm            export of samples for OpenAI's guided-diffusion evaluator.
integrity      SHA-256 of files and arrays, and the JSON records that carry them.
torch_weights  PyTorch state_dicts read without depending on torch; converted .npz files.
"""
