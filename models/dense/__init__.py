"""Dense prediction on mmpt image towers: feature pyramid, UPerNet, Mask R-CNN, oriented boxes."""
