"""Write the digits detection data set; with ``--epochs``, train YOLOv8n with and without SGDM on it.

    python scripts/make_digits_detection.py OUT_DIR [--num-train 400] [--num-val 100] [--seed 0]
                                            [--epochs N [--imgsz 128] [--models yolov8n.yaml yolov8n-sgdm.yaml]]

The data set: scikit-learn's digits on 96-128 px canvases, YOLO layout + data YAML (its path is printed). With
``--epochs``, each model YAML is trained by Ultralytics on CPU for the same budget and validated (needs the
``ultralytics`` extra); mAP50 and mAP50-95 are printed side by side, with the
untrained model's mAP50 as the chance level (docs/detection.md).
"""
import argparse

from dynzoo.tools.digits_detection import make_digits_detection


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('root', help='output folder')
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--epochs', type=int, default=0, help='train each of --models for this many epochs')
    parser.add_argument('--imgsz', type=int, default=128)
    parser.add_argument('--models', nargs='+', default=['yolov8n.yaml', 'yolov8n-sgdm.yaml'])
    args = parser.parse_args(argv)
    data = make_digits_detection(args.root, args.num_train, args.num_val, args.seed)
    print(data)
    if args.epochs:
        from dynzoo.integrations.ultralytics.digits import train_digits
        results = {m: train_digits(m, data, args.epochs, imgsz=args.imgsz, project=f'{args.root}/runs', seed=args.seed)
                   for m in args.models}
        print(f'{"model":<24}{"params":>12}{"mAP50":>8}{"mAP50-95":>10}{"untrained mAP50":>17}  '
              f'({args.epochs} epochs, imgsz {args.imgsz})')
        for m, r in results.items():
            print(f'{m:<24}{r["params"]:>12,.0f}{r["map50"]:>8.3f}{r["map"]:>10.3f}{r["untrained_map50"]:>17.3f}')


if __name__ == '__main__':
    main()
