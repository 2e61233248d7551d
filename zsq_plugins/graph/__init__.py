"""A model's structure as the passes over it need it: reconstruction blocks found from the
torch.fx graph, and running one block of a toolkit's model on cached block inputs. Shared by
block reconstruction and adaptive BN, which both walk a model block by block."""
