"""Task 2: the CNN of Table 2, trained with plain SGD on CIFAR-10 (the starter's settings).

    python task2.py                        # SGD, lr 5e-2, batch 64, 10 epochs, early stop 4
    python task2.py --epochs 2 --device cpu
From a notebook cell: `import task2; trainer = task2.main(["--epochs", "2"])`.
"""
import torch
from torch import nn

import dataloaders
import utils
from trainer import Trainer
from utils import create_plots


class ExampleModel(nn.Module):
    """Table 2: three conv 5x5 (padding 2) + ReLU + max-pool 2x2 stages, then two fully-connected layers."""

    def __init__(self, image_channels, num_classes):
        super().__init__()
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(image_channels, 32, kernel_size=5, stride=1, padding=2),  # [B, 32, 32, 32]
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),                               # [B, 32, 16, 16]
            nn.Conv2d(32, 64, kernel_size=5, stride=1, padding=2),               # [B, 64, 16, 16]
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),                               # [B, 64, 8, 8]
            nn.Conv2d(64, 128, kernel_size=5, stride=1, padding=2),              # [B, 128, 8, 8]
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),                               # [B, 128, 4, 4]
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),                                                        # [B, 2048]
            nn.Linear(128 * 4 * 4, 64),                                          # [B, 64]
            nn.ReLU(),
            nn.Linear(64, num_classes),                                          # [B, num_classes]
        )  # no softmax here: nn.CrossEntropyLoss applies it to the logits

    def forward(self, x):
        """Images [B, C, 32, 32] -> logits [B, num_classes]."""
        return self.classifier(self.feature_extractor(x))


def main(argv=()):
    """Train, evaluate and plot; `argv` as on the command line (the defaults when called with none)."""
    parser = utils.common_parser("task2.py", __doc__, epochs=10, batch_size=64, learning_rate=5e-2,
                                 early_stop_count=4)
    args = parser.parse_args(argv)
    utils.set_seed(args.seed, args.deterministic)
    device = utils.get_device(args.device)
    loaders = dataloaders.load_cifar10(args.batch_size, data_dir=args.data_dir, device=device,
                                       seed=args.seed, split_seed=args.split_seed)
    model = ExampleModel(image_channels=3, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    trainer = Trainer(args.batch_size, args.learning_rate, args.early_stop_count, args.epochs, model, loaders,
                      optimizer=optimizer, device=device, validations_per_epoch=args.validations_per_epoch,
                      **utils.speed_options(args, device), **utils.checkpoint_options(args),
                      name="task2", settings=vars(args))
    trainer.train()
    create_plots(trainer, "task2", args.show)
    return trainer


if __name__ == "__main__":
    utils.run_cli(main, resumable=True)
