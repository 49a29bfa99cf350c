"""Task 1: the theory questions, computed and cross-checked with PyTorch.

    python task1.py                 # prints the answers and writes results/task1.md for the report
"""
import argparse
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import task2
import utils

IMAGE = np.array([[1, 0, 2, 3, 1],
                  [3, 2, 0, 7, 0],
                  [0, 6, 1, 1, 4]])
SOBEL = np.array([[-1, 0, 1],
                  [-2, 0, 2],
                  [-1, 0, 1]])


def convolve(image, kernel, padding_mode):
    """True 2-D convolution (kernel flipped), output the size of the input; borders padded by numpy's mode."""
    k = kernel.shape[0] // 2
    padded = np.pad(image, k, mode=padding_mode)  # "constant" pads zeros, "reflect" mirrors (edge not repeated)
    out = np.zeros(image.shape, dtype=np.int64)
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            for m in range(-k, k + 1):
                for n in range(-k, k + 1):
                    # y[i, j] = sum over m, n of x[i - m, j - n] * h[m, n]: the flip makes it a convolution
                    out[i, j] += padded[i - m + k, j - n + k] * kernel[m + k, n + k]
    return out


def convolve_with_torch(image, kernel, padding_mode):
    """The same with F.conv2d, which correlates: it needs the kernel flipped in both axes."""
    x = torch.tensor(image, dtype=torch.float64).view(1, 1, *image.shape)
    x = F.pad(x, (1, 1, 1, 1), mode={"constant": "constant", "reflect": "reflect"}[padding_mode])
    w = torch.tensor(np.flip(kernel).copy(), dtype=torch.float64).view(1, 1, 3, 3)
    return F.conv2d(x, w)[0, 0].round().long().numpy()


def translation_sensitivity(trials=50, seed=0):
    """Mean relative change of each operation's output, ||f(x') - f(x)|| / ||f(x)||, when x' is x moved by one pixel."""
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
    operations = {"convolution (3x3)": conv, "activation (ReLU)": nn.ReLU(),
                  "max pooling (2x2, stride 2)": nn.MaxPool2d(2)}
    changes = dict.fromkeys(operations, 0.0)
    with torch.no_grad():
        for _ in range(trials):
            # Sparse features (20 points of random sign and size) move as a whole: the change is all shift.
            x = torch.zeros(1, 1, 32, 32)
            x.view(-1)[torch.randperm(32 * 32, generator=generator)[:20]] = torch.randn(20, generator=generator)
            moved = torch.roll(x, shifts=1, dims=3)  # one pixel to the right, wrapping round: no border effects
            for name, operation in operations.items():
                a, b = operation(x), operation(moved)
                changes[name] += ((a - b).norm() / a.norm()).item() / trials
    return changes


def output_size(size, kernel, padding=0, stride=1):
    """Spatial output size of a convolution or pooling layer: (W - F + 2P) / S + 1."""
    return (size - kernel + 2 * padding) // stride + 1


def answers():
    """Every answer of Task 1, each cross-checked; returns {question: (answer text, details)}."""
    zero, reflect = convolve(IMAGE, SOBEL, "constant"), convolve(IMAGE, SOBEL, "reflect")
    assert np.array_equal(zero, convolve_with_torch(IMAGE, SOBEL, "constant"))
    assert np.array_equal(reflect, convolve_with_torch(IMAGE, SOBEL, "reflect"))

    changes = translation_sensitivity()
    least = min(changes, key=changes.get)

    padding = (5 - 1) // 2
    conv_c = nn.Conv2d(3, 6, 5, padding=padding)
    assert conv_c(torch.zeros(1, 3, 32, 32)).shape[-2:] == (32, 32)

    kernel_d = 512 - 504 + 1  # 504 = 512 - F + 1 with no padding and stride 1
    assert output_size(512, kernel_d) == 504
    assert nn.Conv2d(3, 12, kernel_d)(torch.zeros(1, 3, 512, 512)).shape == (1, 12, 504, 504)
    pooled = output_size(504, 2, stride=2)
    assert nn.MaxPool2d(2, 2)(torch.zeros(1, 12, 504, 504)).shape[-1] == pooled
    second = output_size(pooled, 3)
    assert nn.Conv2d(12, 1, 3)(torch.zeros(1, 12, pooled, pooled)).shape[-1] == second

    rows, total = parameter_table()
    assert total == sum(p.numel() for p in task2.ExampleModel(3, 10).parameters())

    return {
        "1a": ("zero padding:\n" + matrix(zero) + "\nreflection padding:\n" + matrix(reflect),
               "True convolution: the kernel is flipped in both axes, y[i,j] = sum x[i-m, j-n] h[m,n]. "
               "Borders: one pixel of padding on each side keeps the 3x5 size; with zero padding the "
               "border pixels see zeros outside the image, with reflection padding they see the image "
               "mirrored. Cross-checked against torch.nn.functional.conv2d with the flipped kernel."),
        "1b": (least.split(" (")[0],
               "Mean relative change of the output when the input (sparse features) moves by one pixel: "
               + ", ".join(f"{name} {change:.2f}" for name, change in changes.items())
               + ". Convolution and activation move with the input (they are equivariant), so their "
                 "outputs change as much as the input does; max pooling reports only the maximum of "
                 "each window, which often stays in the same window when the input shifts."),
        "1c": (f"{padding} pixels on each side", f"(W - F + 2P)/S + 1 = W with F = 5, S = 1 gives P = (F - 1)/2 = "
               f"{padding}; checked with nn.Conv2d(3, 6, 5, padding={padding}) on 32x32 (output 32x32)."),
        "1d": (f"{kernel_d}x{kernel_d}", f"504 = (512 - F + 0)/1 + 1, so F = {kernel_d}; checked with "
               f"nn.Conv2d(3, 12, {kernel_d}) on 512x512 (output 12x504x504)."),
        "1e": (f"{pooled}x{pooled}", "(504 - 2)/2 + 1 = 252; checked with nn.MaxPool2d(2, 2)."),
        "1f": (f"{second}x{second}", f"({pooled} - 3)/1 + 1 = {second}; checked with nn.Conv2d(12, 1, 3)."),
        "1g": (f"{total:,} parameters", "\n".join(rows)
               + "\nChecked against task2.ExampleModel (the Table-2 network)."),
    }


def matrix(values):
    """A small integer matrix as aligned text rows."""
    return "\n".join(" ".join(f"{v:4d}" for v in row) for row in values)


def parameter_table():
    """Table 2's parameters per layer, by formula -> (text rows, total)."""
    layers = [("conv1 5x5, 3 -> 32", 5 * 5 * 3 * 32, 32), ("conv2 5x5, 32 -> 64", 5 * 5 * 32 * 64, 64),
              ("conv3 5x5, 64 -> 128", 5 * 5 * 64 * 128, 128), ("fc4 128*4*4 -> 64", 128 * 4 * 4 * 64, 64),
              ("fc5 64 -> 10", 64 * 10, 10)]
    rows = [f"{name}: {weights:,} weights + {biases} biases = {weights + biases:,}"
            for name, weights, biases in layers]
    return rows, sum(weights + biases for _, weights, biases in layers)


def to_markdown(results):
    """The answers as the report's Task 1 section."""
    lines = ["## Task 1", ""]
    for question, (answer, details) in results.items():
        lines += [f"### Task {question}", ""]
        if "\n" in answer:
            lines += ["```", answer, "```", ""]
        else:
            lines += [f"**{answer}**", ""]
        if "\n" in details:
            lines += ["```", details, "```", ""]
        else:
            lines += [details, ""]
    return "\n".join(lines)


def main(argv=()):
    """Print the answers and write them as Markdown; `argv` as on the command line."""
    parser = argparse.ArgumentParser(prog="task1.py", description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--output", default="results/task1.md", help="where the Markdown section goes")
    args = parser.parse_args(argv)
    results = answers()
    for question, (answer, details) in results.items():
        print(f"Task {question}:" + ("\n" if "\n" in answer else " ") + answer)
        print("\n".join("    " + line for line in details.splitlines()) + "\n")
    path = pathlib.Path(args.output)
    utils.save_text(to_markdown(results), path)
    print(f"saved {path}")
    return results


if __name__ == "__main__":
    utils.run_cli(main)
