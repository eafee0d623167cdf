"""Case 31 (/work/shared/cases/31_finetune_bn_reestimation): a small binary CNN (BN after every
conv, sign modules with a clip STE, binary weights scaled by mean|W|) for 1x16x16 inputs, and a
small learnable data set (10 classes, a fixed coarse +-1 pattern each, plus noise). ``load``
follows bnnshift's ``module:function`` data contract (train_x, train_y, val_x, val_y)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SignSTE(nn.Module):
    def forward(self, x):
        c = x.clamp(-1, 1)
        return (torch.sign(x) - c).detach() + c


class BinConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        scale = w.abs().mean(dim=(1, 2, 3), keepdim=True).detach()
        wb = (torch.sign(w) - w).detach() + w
        return F.conv2d(x, wb * scale, None, self.stride, self.padding)


class Net(nn.Module):
    def __init__(self, c=16, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.act1 = SignSTE()
        self.conv1 = BinConv(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act2 = SignSTE()
        self.conv2 = BinConv(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        x = self.bn1(self.conv1(self.act1(x)))
        x = self.bn2(self.conv2(self.act2(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build():
    return Net()


def make(n_train=4096, n_val=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 2, (10, 1, 4, 4), generator=g).float() * 2 - 1
    pattern = F.interpolate(coarse, size=(16, 16), mode="nearest")

    def draw(n):
        y = torch.randint(0, 10, (n,), generator=g)
        return (pattern[y] + 1.5 * torch.randn(n, 1, 16, 16, generator=g)) / 1.8, y

    tx, ty = draw(n_train)
    vx, vy = draw(n_val)
    return tx, ty, vx, vy


def load(**kwargs):
    return make()


def train(model, steps, lr, seed, data=None):
    """The user's plain loop: Adam, batches of 128 drawn at random, train mode."""
    tx, ty = (data or make())[:2]
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(tx), (128,), generator=g)
        loss = F.cross_entropy(model(tx[idx]), ty[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model
