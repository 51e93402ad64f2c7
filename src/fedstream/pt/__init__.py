"""PyTorch on the sites: the trainer API and CIFAR-10 without torchvision."""
